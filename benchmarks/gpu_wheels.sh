#!/usr/bin/env bash
# Here, before a lent-GPU session: the wheels that machine lacks (it has torch, numpy, scipy, pluggy, typer,
# rich, pyyaml, but no package registry) and this project's own, into the ignored folder .whl/, which the
# device call carries and benchmarks/gpu_session.sh installs. Rebuild after every code change.
set -eu
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  torchio==1.2.1 nibabel==5.4.2 pydicom==3.0.2 simpleitk==2.5.7 deprecated==1.3.1 humanize==4.17.0 monai==1.6.1
python3 -m pip wheel -q --no-deps --no-build-isolation . -w .whl
du -sh .whl
rm -rf build
