"""Create the ledger: links, synced items, cursors and parked items.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "links",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("incident_id", sa.String(200), nullable=False),
        sa.Column("incident_number", sa.BigInteger),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("ticket_key", sa.String(200)),
        sa.Column("ticket_id", sa.String(200)),
        sa.Column("ticket_url", sa.Text),
        sa.Column("create_started_at", sa.DateTime(timezone=True)),
        sa.Column("mdr_update_time", sa.BigInteger),
        sa.Column("ticket_updated", sa.DateTime(timezone=True)),
        sa.Column("fields_hash", sa.String(64)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("connection", "incident_id", name="uq_links_incident"),
    )
    op.create_index("ix_links_ticket_id", "links", ["connection", "ticket_id"])

    op.create_table(
        "synced_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("incident_id", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("source_id", sa.String(200), nullable=False),
        sa.Column("target_id", sa.String(200)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempt_started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint(
            "connection", "incident_id", "kind", "direction", "source_id", name="uq_synced_items_source"
        ),
    )
    op.create_index("ix_synced_items_incident", "synced_items", ["connection", "incident_id"])
    op.create_index("ix_synced_items_target", "synced_items", ["connection", "kind", "target_id"])

    op.create_table(
        "cursors",
        sa.Column("connection", sa.String(64), primary_key=True),
        sa.Column("side", sa.String(32), primary_key=True),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )

    op.create_table(
        "parked_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("item_id", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("connection", "kind", "item_id", name="uq_parked_items_item"),
    )


def downgrade() -> None:
    op.drop_table("parked_items")
    op.drop_table("cursors")
    op.drop_index("ix_synced_items_target", table_name="synced_items")
    op.drop_index("ix_synced_items_incident", table_name="synced_items")
    op.drop_table("synced_items")
    op.drop_index("ix_links_ticket_id", table_name="links")
    op.drop_table("links")
