"""The device mesh of data-parallel training: one 'data' axis over every device of every process."""

import jax
import numpy as np
from jax.sharding import Mesh


def data_mesh() -> Mesh:
  """A 1-D mesh over every device of every process; the batch is split along 'data'."""
  return Mesh(np.asarray(jax.devices()), ('data',))
