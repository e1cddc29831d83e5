"""Are the prepared wheels (tools/prepare_gpu_wheels.sh) enough for the GPU machine's image?

Nothing can be downloaded there, so a missing wheel costs the whole GPU call; this finds it here,
from the wheels' own metadata: every wheel installs on the image's python 3.12 on x86-64 Linux, the
packages the check needs are among them, no package comes twice (two versions stop the whole
install), they fit the size limit, and every requirement of every wheel (Requires-Dist, markers
evaluated for that python) is met by the image (tools/gpu_image.txt) or by another wheel. Versions
the image holds are not all known, so a requirement on one is met by its name; the install step
then resolves versions against what is really there.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

NEEDED = ("deepspeed", "megatron-core", "datasets")
MAX_BYTES = 48 << 20
IMAGE_FILE = Path(__file__).with_name("gpu_image.txt")
# The image: CPython 3.12.3 on x86-64 Linux, whose pip takes manylinux wheels.
IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
INTERPRETERS = {"py3", "py312", "cp312"}
ABIS = {"none", "abi3", "cp312"}


def image_packages(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """{canonical name: version or None}: the image's packages as tools/gpu_image.txt lists them."""
    packages = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = version or None
    return packages


def installs_on_image(filename: str) -> bool:
    """Whether pip on the image takes this wheel: a tag for python 3.12 and an x86-64 Linux platform."""
    _, _, _, tags = parse_wheel_filename(filename)
    return any(t.interpreter in INTERPRETERS and t.abi in ABIS
               and (t.platform == "any" or re.fullmatch(r"(manylinux\w*|linux)_x86_64", t.platform))
               for t in tags)


def requirements(wheel: Path) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the image (extras' and other platforms' left out)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = archive.read(name).decode()
    found = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
             if line.startswith("Requires-Dist:")]
    return [r for r in found if r.marker is None or r.marker.evaluate(IMAGE_PYTHON)]


def problems(wheel_dir: Path, image: dict[str, str | None] | None = None) -> list[str]:
    """What keeps the wheels in `wheel_dir` from installing on the image without a download, one
    line each naming the wheel or package; empty when nothing does."""
    image = image_packages() if image is None else image
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if not wheels:
        return [f"{wheel_dir}: no wheels; run bash tools/prepare_gpu_wheels.sh"]
    found, errors = {}, []
    for wheel in wheels:
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        if name in found:
            errors.append(f"{wheel.name}: a second wheel of {name} (beside {found[name].name})")
        found[name] = wheel
        if not installs_on_image(wheel.name):
            errors.append(f"{wheel.name}: not installable on the image's CPython 3.12 (x86-64 Linux)")
    errors += [f"{name}: no wheel of it, and the image lacks it" for name in NEEDED if name not in found]
    for wheel in found.values():
        for req in requirements(wheel):
            name = canonicalize_name(req.name)
            if name in found:
                continue
            if name not in image:
                errors.append(f"{wheel.name}: requires {req}, which neither the image nor a wheel holds")
            elif image[name] and not req.specifier.contains(image[name], prereleases=True):
                errors.append(f"{wheel.name}: requires {req}, the image holds {name}=={image[name]}, no wheel another")
    total = sum(w.stat().st_size for w in wheels)
    if total > MAX_BYTES:
        errors.append(f"{wheel_dir}: {total / 2**20:.1f} MiB of wheels, over the {MAX_BYTES >> 20} MiB limit")
    return errors


def summary(wheel_dir: Path) -> dict:
    """The wheels' names and total size, for the check's summary."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    return {"wheels": [w.name for w in wheels], "wheel_mib": round(sum(w.stat().st_size for w in wheels) / 2**20, 2)}


def beyond_image() -> list[str]:
    """Installed distributions the image lacks: the rehearsal removes them from its venv (pip pulls
    some as dependencies of image packages), so a wheel missing here is missing there too."""
    from importlib.metadata import distributions

    image = image_packages()
    return sorted({canonicalize_name(d.metadata["Name"]) for d in distributions()} - set(image))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--beyond-image"]:
        print("\n".join(beyond_image()))
    else:  # the wheels folder given: what keeps it from installing there, one line each
        errors = problems(Path(sys.argv[1] if len(sys.argv) > 1 else "build/gpu_wheels"))
        print("\n".join(errors) or "the wheels are complete for the image")
        sys.exit(1 if errors else 0)
