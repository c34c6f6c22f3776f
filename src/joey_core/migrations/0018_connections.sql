-- Data connections (docs/workloads.md): owned by one workspace, shared with others.
-- `details` holds the details with every secret value redacted; `secrets` the secret values,
-- sealed with Fernet under the registry's JOEY_SECRET_KEY (NULL when there are none).
CREATE TABLE connections (
    id           bigserial PRIMARY KEY,
    workspace_id bigint NOT NULL REFERENCES workspaces(id),
    name         text NOT NULL,
    type         text NOT NULL,
    details      jsonb NOT NULL,
    secrets      bytea,
    created_by   text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, name)
);

CREATE TABLE connection_shares (
    connection_id bigint NOT NULL REFERENCES connections(id) ON DELETE CASCADE,
    workspace_id  bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    added_by      text NOT NULL DEFAULT '',
    added_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, workspace_id)
);
CREATE INDEX connection_shares_workspace ON connection_shares (workspace_id);
