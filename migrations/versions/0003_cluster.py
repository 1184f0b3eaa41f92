"""Add what several instances on one PostgreSQL database need.

- `leases`: which instance works a connection, until when, and its epoch,
  which grows on every change of holder so a stalled holder is fenced out.
- `cluster_instances`: the live instances, so each takes a fair share of
  the connections.
- `token_chains`: the MDR token pair of a client, encrypted with a key that
  is never stored in the database, for the instance that takes a connection over.

Only new tables, so instances of the previous version keep running while
this migration is applied.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("connection", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200)),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("acquired_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "cluster_instances",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "token_chains",
        sa.Column("client_id", sa.String(200), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("token_chains")
    op.drop_table("cluster_instances")
    op.drop_table("leases")
