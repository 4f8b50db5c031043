"""``python -m datagen.sources.fetch [source.<key>=<value> ...]``: fill the Materials Project cache once.

Same as ``python scripts/fetch_materials_project.py``; see :mod:`datagen.sources.materials_project`.
"""

import sys

from datagen.sources.materials_project import main

if __name__ == "__main__":
    sys.exit(main())
