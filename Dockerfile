FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
COPY jobs ./jobs
COPY worker ./worker
COPY aivvm_batch ./aivvm_batch
RUN pip install --no-deps . && useradd --create-home --uid 10001 aivvm
COPY samples ./samples

USER aivvm
ENTRYPOINT ["aivvm-batch"]
CMD ["worker"]
