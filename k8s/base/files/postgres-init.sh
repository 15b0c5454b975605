#!/bin/sh
# Runs once, on an empty data directory (docker-entrypoint-initdb.d), in compose and in k8s.
# POSTGRES_DB (mlflow) is created by the image; Prefect gets its own database.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT 'CREATE DATABASE prefect' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect')\gexec
SQL
