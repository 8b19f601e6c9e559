"""Coverage-guided fuzzing of velo's parsers with atheris (libFuzzer).

    python -m fuzz.run mux|header [libFuzzer options...]

e.g. ``python -m fuzz.run mux fuzz/corpus/mux -max_total_time=300``: new inputs that
reach new coverage are added to the corpus folder given, crashes are written as
``crash-*`` files in the current directory.  `make test` runs each target briefly
(tests/mux/test_fuzz.py); a longer run is a manual step, see fuzz/README.md.
"""

import sys

import atheris

with atheris.instrument_imports(include=["velo"]):
    from fuzz.targets import header_input, mux_input

TARGETS = {"mux": mux_input, "header": header_input}


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], lambda data: target(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
