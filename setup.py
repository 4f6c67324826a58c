"""Ships the top-level ``profiles/`` and ``targets/`` folders inside the package as
``compressor/_data/`` so they also exist after a non-editable ``pip install .``."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        root = Path(__file__).resolve().parent
        for kind in ("profiles", "targets"):
            dst = Path(self.build_lib) / "compressor" / "_data" / kind
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(root / kind, dst)


setup(cmdclass={"build_py": BuildWithData})
