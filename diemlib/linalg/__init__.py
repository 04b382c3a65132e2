"""Linear algebra of the method: DPLR covariances, probabilistic PCA, Krylov solvers."""

from .dplr import DPLR
from .ppca import ppca
from .solvers import CG, GMRES, solver

__all__ = ["CG", "DPLR", "GMRES", "ppca", "solver"]
