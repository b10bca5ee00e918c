"""The paper's experiments, one module per paper section; each notebook's logic lives in the module of its name.

=====================  ==========================================================================
module                 notebooks
=====================  ==========================================================================
``core``               every notebook: Setup, run_grid, summaries over seeds, the paper's numbers
``main_comparison``    ``table1``, ``table2``, ``table5``, ``table6``, ``training_dynamics``
``ablations``          ``table3`` (beta, n, the selection score's readings, design diagnostics)
``stability``          ``table4``
``cost``               ``table7``, ``table8``
``quickstart``         ``quickstart``
``runner``             ``python -m mass_dpo.experiments NOTEBOOK`` (train a notebook's runs under accelerate)
=====================  ==========================================================================

Every name is also importable from the package (``from mass_dpo import experiments as E; E.run_grid(...)``).
"""

from .ablations import *  # noqa: F401,F403
from .core import *  # noqa: F401,F403
from .core import _config, _key  # noqa: F401
from .cost import *  # noqa: F401,F403
from .main_comparison import *  # noqa: F401,F403
from .quickstart import *  # noqa: F401,F403
from .runner import *  # noqa: F401,F403
from .stability import *  # noqa: F401,F403
