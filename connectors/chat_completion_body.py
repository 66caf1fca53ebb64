"""The parts of a Chat Completions answer tierflow reads, decoded by ``msgspec``.

An answer with logprobs is mostly its tokens, each with its alternatives (75 KB for a
pack of 8 records at 5 alternatives): decoding it into these typed structs, and
nothing else of it, takes half the CPU of building Python dicts of all of it. A body
of the wrong shape (a choice that is not an object, a logprob that is not a number)
is ``Unreadable``, with where it went wrong (a ``malformed`` answer to the client).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

__all__ = ["ChatCompletion", "Unreadable", "read"]


class Unreadable(ValueError):
  """An answer body that is not JSON, or not of the Chat Completions shape."""


class _Alternative(msgspec.Struct):
  token: str
  logprob: float


class _Token(msgspec.Struct):
  token: str
  logprob: float
  top_logprobs: Optional[list[_Alternative]] = None


class _Logprobs(msgspec.Struct):
  content: Optional[list[_Token]] = None


class _Message(msgspec.Struct):
  content: Optional[str] = None


class _Choice(msgspec.Struct):
  message: Optional[_Message] = None
  logprobs: Optional[_Logprobs] = None
  finish_reason: Any = None


class _PromptDetails(msgspec.Struct):
  cached_tokens: Optional[int] = None


class _CompletionDetails(msgspec.Struct):
  reasoning_tokens: Optional[int] = None


class _Usage(msgspec.Struct):
  prompt_tokens: Optional[int] = None
  completion_tokens: Optional[int] = None
  prompt_tokens_details: Optional[_PromptDetails] = None
  completion_tokens_details: Optional[_CompletionDetails] = None


class ChatCompletion(msgspec.Struct):
  choices: Optional[list[_Choice]] = None
  usage: Optional[_Usage] = None
  model: Any = None


_DECODER = msgspec.json.Decoder(ChatCompletion)


def read(body: Union[bytes, dict]) -> ChatCompletion:
  """The answer from its raw body, or from its JSON object already parsed (a batch
  result line's ``body``); ``Unreadable``, with why, if it is neither JSON nor of
  the Chat Completions shape."""
  try:
    if isinstance(body, (bytes, bytearray, memoryview)):
      return _DECODER.decode(body)
    return msgspec.convert(body, ChatCompletion)
  except msgspec.ValidationError as e:
    if " - at `$" not in str(e):  # the body itself, not a part of it
      raise Unreadable("answer is not a JSON object") from None
    raise Unreadable(f"answer is not a Chat Completion: {e}") from None
  except msgspec.DecodeError as e:
    raise Unreadable(f"answer is not JSON: {e}") from None
