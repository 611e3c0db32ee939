#!/usr/bin/env bash
# A local S3 endpoint for development: moto's server on loopback.
#   infra/local-s3.sh [PORT]          starts it in the foreground (Ctrl-C stops it)
# In another shell, point every client (boto3, s3fs, pyarrow, Ray workers) at it:
#   export AWS_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev \
#          AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
# then create a bucket (python -c "import s3fs; s3fs.S3FileSystem().mkdir('my-bucket')")
# and use s3://my-bucket/... URLs in the job file. Data lives in memory only.
set -euo pipefail
PORT="${1:-5555}"
BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
SERVER="$BIN/moto_server"
[ -x "$SERVER" ] || SERVER="$(command -v moto_server)" || { echo "moto_server not found: run 'make venv' first" >&2; exit 1; }
echo "local S3 on http://127.0.0.1:$PORT (in memory; Ctrl-C to stop)" >&2
exec "$SERVER" -H 127.0.0.1 -p "$PORT"
