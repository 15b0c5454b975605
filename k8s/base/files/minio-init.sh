#!/bin/sh
# One-shot MinIO set-up, shared by deploy/compose.yaml (minio-init) and k8s (Job minio-init):
# the buckets, and an application user that is not the root user. Idempotent.
# Needs MINIO_URL, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD, MEDDIFFUSE_S3__ACCESS_KEY, MEDDIFFUSE_S3__SECRET_KEY.
set -eu
: "${MINIO_URL:=http://minio:9000}"
: "${MC_CONFIG_DIR:=/tmp/.mc}"
export MC_CONFIG_DIR
i=0
until mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
  i=$((i + 1))
  if [ "$i" -ge 30 ]; then echo "minio-init: MinIO at $MINIO_URL did not answer" >&2; exit 1; fi
  sleep 2
done
mc mb --ignore-existing local/meddiffuse   # object store: MEDDIFFUSE_STORE=s3://meddiffuse/store
mc mb --ignore-existing local/mlflow       # MLflow artifacts: s3://mlflow/artifacts
mc admin user add local "$MEDDIFFUSE_S3__ACCESS_KEY" "$MEDDIFFUSE_S3__SECRET_KEY"
# Attaching an attached policy fails with "...already in effect": that is success here (no grep needed).
if ! out=$(mc admin policy attach local readwrite --user "$MEDDIFFUSE_S3__ACCESS_KEY" 2>&1); then
  case "$out" in
    *already*) ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
fi
echo "minio-init: buckets meddiffuse, mlflow and user $MEDDIFFUSE_S3__ACCESS_KEY ready"
