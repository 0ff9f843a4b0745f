"""Error type raised for data configuration and availability problems."""


class DataError(ValueError):
  """A dataset is unknown, unsupported for an operation, or not prepared."""
