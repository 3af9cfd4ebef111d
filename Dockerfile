# The lrc_ray image for Ray clusters (KubeRay's RayCluster/RayJob in cluster/kuberay/, or the
# `docker:` section of cluster/aws-gpu.yaml): Ray's own image, with lrc_ray installed the way
# `make install` does it, at the versions of requirements/constraints.txt. Build from the
# repository root and push where the cluster pulls from:
#
#   docker build -t REGISTRY/lrc-ray:0.1.0-ray2.60.0-py311-gpu .
#   docker push REGISTRY/lrc-ray:0.1.0-ray2.60.0-py311-gpu
#
# The base's Ray and Python must be those of pyproject.toml (ray 2.60, Python 3.11: the
# constraints were written there). For CPU-only nodes: --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# As the Makefile: torch first (PyPI's Linux wheel, with CUDA), then the package with its extras.
ARG TORCH_VERSION=2.13.0
WORKDIR /home/ray/lrc_ray
COPY --chown=ray:users requirements/constraints.txt requirements/constraints.txt
RUN pip install --no-cache-dir --constraint requirements/constraints.txt torch==${TORCH_VERSION}
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users lrc_ray ./lrc_ray
RUN pip install --no-cache-dir --constraint requirements/constraints.txt -e '.[dashboards]' \
    && python -c "import ray, lrc_ray; assert ray.__version__.startswith('2.60.'), ray.__version__"
# What jobs and users run from the checkout: search spaces, cluster files, benchmarks.
COPY --chown=ray:users search_spaces ./search_spaces
COPY --chown=ray:users cluster ./cluster
COPY --chown=ray:users bench ./bench
