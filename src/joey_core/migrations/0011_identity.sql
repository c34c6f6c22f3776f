-- Identity and access: users, their tokens, workspace membership and the audit trail.
-- The platform admin is created by the registry at start (JOEY_ADMIN_PASSWORD), not here: it then
-- becomes the owner of every workspace that has none (an upgraded database's `default` included).
CREATE TABLE users (
    username      text PRIMARY KEY CHECK (username ~ '^[a-z0-9][a-z0-9._-]{1,62}$'),
    email         text NOT NULL DEFAULT '',
    password_hash text NOT NULL,   -- Argon2id, encoded with its parameters and salt
    admin         boolean NOT NULL DEFAULT false,
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tokens (
    id           bigserial PRIMARY KEY,
    token_sha256 text NOT NULL UNIQUE,   -- the secret itself is never stored
    username     text NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    name         text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('session', 'api')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
-- An API token's name is unique among the user's live (unrevoked) ones; expired ones are revoked
-- when a new one takes the name.
CREATE UNIQUE INDEX tokens_live_api_name ON tokens (username, name) WHERE kind = 'api' AND revoked_at IS NULL;
CREATE INDEX tokens_username ON tokens (username);

CREATE TABLE workspace_members (
    workspace_id bigint NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    username     text NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    role         text NOT NULL CHECK (role IN ('owner', 'collaborator')),
    PRIMARY KEY (workspace_id, username)
);
CREATE INDEX workspace_members_username ON workspace_members (username);

-- Names, not keys: the trail outlives the users and workspaces it mentions.
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    time      timestamptz NOT NULL DEFAULT now(),
    username  text NOT NULL DEFAULT '',
    action    text NOT NULL,
    workspace text NOT NULL DEFAULT '',
    target    text NOT NULL DEFAULT '',
    outcome   text NOT NULL,
    message   text NOT NULL DEFAULT ''
);
CREATE INDEX audit_log_time ON audit_log (time);
