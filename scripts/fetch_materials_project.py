"""Fill the Materials Project structure cache once (needs MP_API_KEY and network); datagen jobs then read it.

    export MP_API_KEY=<your key>
    python scripts/fetch_materials_project.py source.num_sites=[1,20] source.elements=[O]

Overrides are the ``source.*`` overrides of ``python datagen.py source=materials_project ...`` (the prefix
``source.`` is optional); ``--config FILE`` replaces conf/source/materials_project.yaml; ``--overwrite``
queries again. See :mod:`datagen.sources.materials_project`.
"""

import sys

from datagen.sources.materials_project import main

if __name__ == "__main__":
    sys.exit(main())
