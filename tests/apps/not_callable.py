"""Its `application` is not callable."""

application = 42
