"""Apply hvdllm's fixes to an unpacked Horovod 0.28.1 source tree.

Usage: python patch_horovod.py SRC_DIR

1. Build: torch >= 2.1 headers need C++17, and the torch extension must then
   link the C++17 flavour of gloo; TensorFlow wheels lack the highwayhash
   headers that xla_mpi_ops.cc includes, so that file is left out.
2. Launch: horovodrun writes Open MPI flags in the old single-dash form
   (``-bind-to none``, ``-mca pml ob1``), which Open MPI 5's launcher reads
   as the program name.  The double-dash forms work on Open MPI 4 and 5.

Each edit is checked: if the text to replace is missing (a different Horovod
version, say) the script stops with an error instead of building something
subtly different.  Bump PATCH_LEVEL whenever the edits change, so that
cached wheels built with older edits are not reused.
"""
import pathlib
import re
import sys

PATCH_LEVEL = 2

EDITS = [
    (
        "horovod/torch/CMakeLists.txt",
        "set(CMAKE_CXX_STANDARD 14)",
        "set(CMAKE_CXX_STANDARD 17)",
    ),
    (
        "horovod/torch/CMakeLists.txt",
        "list(APPEND PYTORCH_LINKER_LIBS gloo)",
        "list(APPEND PYTORCH_LINKER_LIBS compatible17_gloo)",
    ),
    (
        "horovod/tensorflow/CMakeLists.txt",
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n',
        "",
    ),
]


# Single-dash Open MPI options in horovod/runner/mpi_run.py -> double dash.
MPIRUN_FILE = "horovod/runner/mpi_run.py"
MPIRUN_OPTION = re.compile(r"""(?<=['"])-(mca|bind-to|map-by|rank-by) """)
MPIRUN_MIN_EDITS = 8


def patch_mpirun_flags(root: pathlib.Path) -> None:
    path = root / MPIRUN_FILE
    text = path.read_text()
    new, count = MPIRUN_OPTION.subn(lambda m: f"--{m.group(1)} ", text)
    if count == 0 and "'--mca pml ob1'" in text:
        return  # already patched
    if count < MPIRUN_MIN_EDITS:
        sys.exit(f"patch_horovod: {MPIRUN_FILE}: expected >= {MPIRUN_MIN_EDITS} Open MPI "
                 f"options, found {count}")
    path.write_text(new)
    print(f"patch_horovod: {MPIRUN_FILE}: {count} Open MPI options -> double-dash form")


def main(src: str) -> None:
    root = pathlib.Path(src)
    patch_mpirun_flags(root)
    for rel, old, new in EDITS:
        path = root / rel
        text = path.read_text()
        if old not in text:
            if not new or new in text:
                continue  # already patched
            sys.exit(f"patch_horovod: {rel}: expected text not found: {old.strip()!r}")
        path.write_text(text.replace(old, new, 1))
        print(f"patch_horovod: {rel}: {old.strip()!r} -> {new.strip()!r}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "--level":
        print(PATCH_LEVEL)
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
