# netra server image: slim Python 3.13, non-root, `netra serve` as entry point.
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NETRA_DATA_DIR=/var/lib/netra

WORKDIR /app
COPY pyproject.toml README.md ./
COPY netra ./netra
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/netra --create-home netra

USER netra
EXPOSE 8000
# Set NETRA_JWT_SECRET (or NETRA_JWT_PUBLIC_KEY) in production; without it the
# server runs in development mode with a secret generated per start.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["netra"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
