"""Add what attachments, responses, status and assets need.

- `synced_items.source_version`: the version of the source item when it was
  copied (an edit time, a response status), so an edit is noticed once.
- `response_decisions`: the audit record of every confirm or decline.
- `asset_cache`: asset details with the time they were read.
- `links.ticket_status` and `links.mdr_status`: the last status each side
  was seen in or moved to, so a change the connector made is not sent back.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("synced_items") as batch:
        batch.add_column(sa.Column("source_version", sa.String(64)))

    with op.batch_alter_table("links") as batch:
        batch.add_column(sa.Column("ticket_status", sa.String(200)))
        batch.add_column(sa.Column("mdr_status", sa.String(32)))

    op.create_table(
        "response_decisions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("incident_id", sa.String(200), nullable=False),
        sa.Column("response_id", sa.String(200), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.String(200), nullable=False),
        sa.Column("actor_name", sa.String(200), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("source_id", sa.String(200)),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "ix_response_decisions_response", "response_decisions", ["connection", "response_id"]
    )
    op.create_index(
        "ix_response_decisions_incident", "response_decisions", ["connection", "incident_id"]
    )

    op.create_table(
        "asset_cache",
        sa.Column("connection", sa.String(64), primary_key=True),
        sa.Column("asset_id", sa.String(200), primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("asset_cache")
    op.drop_index("ix_response_decisions_incident", table_name="response_decisions")
    op.drop_index("ix_response_decisions_response", table_name="response_decisions")
    op.drop_table("response_decisions")
    with op.batch_alter_table("links") as batch:
        batch.drop_column("mdr_status")
        batch.drop_column("ticket_status")
    with op.batch_alter_table("synced_items") as batch:
        batch.drop_column("source_version")
