# bdscan, CPU only: find neural backdoors in image classifiers.
#
#   docker build -t bdscan .
#   docker run --rm bdscan scan sample_models/cifar10_vit_trojan.safetensors         # exit 1: backdoor suspected
#   docker run --rm -v "$PWD:/work" -w /work --user "$(id -u):$(id -g)" bdscan \
#       scan models/classifier.safetensors --data data/clean.npz --sarif bdscan.sarif --report bdscan.html
#
# Exit codes are bdscan's own (0 clean, 1 finding, 2 usage, 3 cannot load, 4 internal error); see docs/ci.md.
# Suspect checkpoints are hostile: bdscan never unpickles one whose static scan finds dangerous imports, and the
# container runs as an unprivileged user with nothing else in it worth stealing.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

# CPU-only PyTorch first, from the PyTorch CPU index (the PyPI wheels bundle CUDA: gigabytes more).
# `pip install .` below then finds torch/torchvision already satisfied and takes the rest from PyPI.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch torchvision

WORKDIR /opt/bdscan-src
COPY pyproject.toml README.md ./
COPY templates/ templates/
COPY bdscan/ bdscan/
RUN pip install . \
    && python -c "import torch; assert not torch.version.cuda, 'a CUDA build of torch was installed'" \
    && rm -rf /opt/bdscan-src

# /app holds the bundled sample models and is where outputs land by default; an unprivileged user owns it.
WORKDIR /app
COPY sample_models/ sample_models/
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin bdscan \
    && chown -R bdscan:bdscan /app \
    && chmod -R u+rwX,go+rX /app

USER bdscan
RUN bdscan --version

ENTRYPOINT ["bdscan"]
CMD ["--help"]
