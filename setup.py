"""Build hook (pyproject.toml holds the configuration): a wheel carries the repository's top-level ``params/`` folder
as ``mass_dpo/_params``, so that an installed package that is not a checkout finds its parameter files
(:func:`mass_dpo.params.params_dir` reads them through ``importlib.resources``). An editable install reads the
checkout's ``params/`` directly and copies nothing."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PARAMS = Path(__file__).resolve().parent / "params"


class BuildPyWithParams(build_py):
    """``build_py``, then ``params/`` copied into the built package as ``mass_dpo/_params``."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        if not PARAMS.is_dir():
            raise FileNotFoundError(f"{PARAMS} is missing: build from a checkout or an sdist of mass-dpo")
        target = Path(self.build_lib) / "mass_dpo" / "_params"
        shutil.rmtree(target, ignore_errors=True)  # no file left over from an earlier build
        self.copy_tree(str(PARAMS), str(target))


setup(cmdclass={"build_py": BuildPyWithParams})
