# The cluster image of the KubeRay manifests (cluster/kuberay/*.yaml): Ray's Python 3.11 GPU image
# with composeae and its `serve` extra (Ray Serve for cluster/serve.yaml) installed at the pinned
# versions of constraints.txt, and the checkout at /home/ray/composeae, the RayJobs' working_dir.
# The `ray up` nodes (cluster/aws-gpu.yaml) install the same: `-c constraints.txt '.[serve]'`.
# Build it from the repository root, push it, and name it in the manifests (keep their
# rayVersion equal to the Ray below):
#   docker build -t registry.example.com/composeae:0.1.0-ray2.60.0-py311-gpu .
FROM rayproject/ray:2.60.0-py311-gpu

COPY --chown=ray:users . /home/ray/composeae
RUN pip install --no-cache-dir -c /home/ray/composeae/constraints.txt \
        "/home/ray/composeae[serve]"
WORKDIR /home/ray/composeae
