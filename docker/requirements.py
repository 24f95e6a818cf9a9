"""Requirements of pyproject.toml for the image's dependency layer, one per line on stdout.

    python requirements.py torch            # torch's requirement (installed from TORCH_INDEX_URL)
    python requirements.py others flower    # every other dependency, the extras named, the build system

Read from pyproject.toml so the image installs what the project declares, before its code is copied.
"""

import re
import sys
import tomllib

project_file = tomllib.load(open("pyproject.toml", "rb"))
project = project_file["project"]
part, extras = sys.argv[1], [name for name in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if name]
wanted = project["dependencies"] + [dep for extra in extras for dep in project["optional-dependencies"][extra]]
is_torch = [re.match(r"torch\s*($|[<>=!~;\[])", dep) is not None for dep in wanted]
if part == "torch":
    print("\n".join(dep for dep, torch in zip(wanted, is_torch) if torch))
else:
    print("\n".join([dep for dep, torch in zip(wanted, is_torch) if not torch] + project_file["build-system"]["requires"]))
