"""Local, offline stand-ins started by the project itself: the embedded Kafka broker and loaders."""
