"""Check that every requirement of the bundled distributions is met.

Usage (after extracting the bundle):  PYTHONPATH=/tmp/site python3 .gpu_bundle/check_deps.py [/tmp/site]
Prints one line per unmet requirement (missing package or version outside the
specifier) and exits 1 if there is any; exits 0 otherwise.
"""
import re, sys, os
from importlib import metadata
try:
    from packaging.requirements import Requirement
    from packaging.markers import default_environment
except ImportError:  # pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.markers import default_environment

site = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/site")
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
# requested extras of the top-level packages
EXTRAS = {"ray": ["default", "data", "train", "tune"]}
installed = {}
for d in metadata.distributions():
    installed.setdefault(norm(d.metadata["Name"]), d)
bundled = [d for d in metadata.distributions(path=[site])]
env = default_environment()
bad = 0
for d in bundled:
    name = norm(d.metadata["Name"])
    extras = [""] + EXTRAS.get(name, [])
    for r in d.requires or []:
        q = Requirement(r)
        if q.marker is not None and not any(q.marker.evaluate(dict(env, extra=e)) for e in extras):
            continue
        have = installed.get(norm(q.name))
        if have is None:
            print(f"MISSING  {name} needs {q}"); bad += 1
        elif q.specifier and not q.specifier.contains(have.version, prereleases=True):
            where = "bundle" if str(have.locate_file("")).startswith(site) else "image"
            print(f"VERSION  {name} needs {q}, found {have.version} ({where})"); bad += 1
print(f"{len(bundled)} bundled distributions checked, {bad} problem(s)")
sys.exit(1 if bad else 0)
