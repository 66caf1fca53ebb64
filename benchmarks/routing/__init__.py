"""Routing benchmark building blocks: real labelled data and real models on both tiers, offline.

``datasets``: labelled public data as ``documents`` records (BBC News, Amazon fine foods).
``tiers``: the two trained classifiers (small, upper) and a provider-server responder
that answers tierflow's classify prompts with them.
"""
