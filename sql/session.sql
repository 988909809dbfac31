-- pg_keel sessions (DESIGN.md §4): the authoritative session record. keel.session_validate,
-- the per-request read, is native (src/session/); the token and its hash are made there too
-- (keel._session_token, keel._session_hash). Only the SHA-256 of a token is stored, and no
-- function returns it.
--
-- Times are the transaction's (now()). A session is valid while it is not revoked, now() is
-- before expires_at, and, with an idle timeout, before idle_expires_at.

CREATE TABLE keel.sessions (
    session_id       uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash       bytea       NOT NULL,
    -- NULL: an anonymous session (0.2.0) until keel.session_login binds a user to it.
    user_id          text,
    data             jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    idle_timeout     interval,
    idle_expires_at  timestamptz,
    -- When the cleanup next looks at the idle expiry (NULL without an idle timeout): the idle
    -- expiry as of the session's creation or last rotation, or of the cleanup's last look.
    -- Touches slide idle_expires_at but leave this, so they stay HOT updates while this is
    -- indexed; the cleanup deletes a session it finds here idle-expired past the grace, and
    -- moves this to the current idle expiry of one that was touched since.
    idle_check_at    timestamptz,
    revoked_at       timestamptz,
    revoke_reason    text,
    -- A rotation with a grace (0.2.0): the replaced token's hash stays valid until
    -- previous_until, and rotated_to is the new token sealed under the old one, so a second
    -- rotation of the old token inside the grace returns the same new token. The cleanup
    -- clears all three once the grace has ended.
    previous_hash    bytea,
    previous_until   timestamptz,
    rotated_to       bytea,
    CONSTRAINT sessions_token_hash_sha256 CHECK (octet_length(token_hash) = 32)
)
-- A touch rewrites last_seen_at and idle_expires_at, neither indexed: with room left on the
-- page it is a HOT update (no index writes). Churn (create, expire, delete) is vacuumed early.
WITH (fillfactor = 70,
      autovacuum_vacuum_scale_factor = 0.02,
      autovacuum_vacuum_insert_scale_factor = 0.05,
      autovacuum_analyze_scale_factor = 0.02);

-- validate: by token hash. user_sessions / revoke_user: by user. Cleanup: by expiry; a
-- revocation sets expires_at to the revocation time, so one index finds both.
CREATE UNIQUE INDEX sessions_token_hash_idx ON keel.sessions (token_hash);
CREATE INDEX sessions_user_idx ON keel.sessions (user_id);
CREATE INDEX sessions_expires_idx ON keel.sessions (expires_at);
CREATE INDEX sessions_idle_check_idx ON keel.sessions (idle_check_at)
    WHERE idle_check_at IS NOT NULL;
-- validate and rotate of a token rotated away inside its grace; the cleanup clearing graces.
CREATE INDEX sessions_previous_hash_idx ON keel.sessions (previous_hash)
    WHERE previous_hash IS NOT NULL;

SELECT pg_catalog.pg_extension_config_dump('keel.sessions', '');

CREATE FUNCTION keel._check_session_data(data jsonb)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF data IS NULL OR jsonb_typeof(data) <> 'object' THEN
        PERFORM keel._invalid_argument('data', 'must be a JSON object (e.g. ''{}'')');
    END IF;
    PERFORM keel._check_payload(keel._raw_bytes(data));
END
$$;

-- An event for a revoked session, when keel.session_events is on; one per session, in
-- order per user, delivered only if the revoking transaction commits.
CREATE FUNCTION keel._session_revoked(session_id uuid, user_id text, reason text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF keel._session_events() THEN
        PERFORM keel.emit('keel.session_revoked',
                          jsonb_build_object('session_id', session_id, 'user_id', user_id,
                                             'reason', reason),
                          aggregate_id => user_id);
    END IF;
END
$$;

-- A session lifecycle event (keel.session_events = lifecycle): a session created or logged
-- in, in order per user (aggregate_id), delivered only if the transaction commits. Never the
-- token.
CREATE FUNCTION keel._session_event(topic text, payload jsonb, user_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF keel._session_lifecycle() THEN
        PERFORM keel.emit(topic, payload, aggregate_id => user_id);
    END IF;
END
$$;

-- The payload of keel.session_expired for a session the cleanup deletes that ended on its
-- own (not revoked): by its ttl or by idleness, and when.
CREATE FUNCTION keel._session_expired(session_id uuid, user_id text, expires_at timestamptz,
                                      idle_expires_at timestamptz)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_build_object(
        'session_id', session_id, 'user_id', user_id,
        'reason', CASE WHEN idle_expires_at < expires_at THEN 'idle' ELSE 'expired' END,
        'ended_at', least(expires_at, idle_expires_at))
$$;

-- One row per user whose sessions are capped (session_create or session_login with
-- max_per_user): its row lock queues that user's capped logins, so each counts the sessions
-- the one before it committed and the cap is exact under concurrency. A table row rather
-- than an advisory lock: no other role can take it. `until` is at least the latest expiry
-- of a session created under a cap; the cleanup deletes the row once that has passed (a
-- later capped login makes it again).
CREATE TABLE keel.session_users (
    user_id  text        PRIMARY KEY,
    until    timestamptz NOT NULL
);
CREATE INDEX session_users_until_idx ON keel.session_users (until);

-- Takes user_id's row lock in keel.session_users (the row is made if missing), held until
-- the transaction ends: what queues the capped logins of one user, and revoke_user behind
-- them. A conflict locks the row even when the WHERE leaves it as it is: `until` is
-- rewritten only when it falls short of the given time, and then to a day past it, so most
-- calls lock the row without writing a new version of it.
CREATE FUNCTION keel._lock_session_user(user_id text, until timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO keel.session_users AS u (user_id, until)
    VALUES (_lock_session_user.user_id, _lock_session_user.until + interval '1 day')
    ON CONFLICT (user_id) DO UPDATE SET until = excluded.until
        WHERE u.until < _lock_session_user.until;
END
$$;

-- Caps user_id's sessions before a capped login adds one: takes the user's row lock, then
-- revokes (reason `evicted`) the least recently seen of its valid sessions other than
-- except_session until `keep` are left. Returns how many it revoked.
--
-- A session row someone holds (a request's touch, in a transaction that may be about to log
-- the same user in) is passed over for the next least recently seen one: it is in use right
-- now, and waiting for it could deadlock with that transaction. Only when every candidate is
-- held does the eviction wait. Each round counts again in a new snapshot, so a candidate
-- revoked or moved to another user meanwhile is not evicted and not miscounted.
CREATE FUNCTION keel._session_evict(user_id text, keep integer, until timestamptz,
                                    except_session uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    need bigint;
    victims uuid[];
    sid uuid;
    evicted integer := 0;
BEGIN
    PERFORM keel._lock_session_user(_session_evict.user_id, _session_evict.until);
    LOOP
        -- A new statement, so a new snapshot: it sees every session the capped logins
        -- queued before this one committed.
        SELECT count(*) - _session_evict.keep INTO need FROM keel.sessions s
         WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
           AND s.expires_at > now() AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
           AND s.session_id IS DISTINCT FROM _session_evict.except_session;
        EXIT WHEN need <= 0;
        victims := ARRAY(
            SELECT s.session_id FROM keel.sessions s
             WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
               AND s.expires_at > now()
               AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
               AND s.session_id IS DISTINCT FROM _session_evict.except_session
             ORDER BY s.last_seen_at, s.created_at, s.session_id DESC
             LIMIT need
               FOR UPDATE SKIP LOCKED);
        IF cardinality(victims) = 0 THEN
            victims := ARRAY(
                SELECT s.session_id FROM keel.sessions s
                 WHERE s.user_id = _session_evict.user_id AND s.revoked_at IS NULL
                   AND s.expires_at > now()
                   AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
                   AND s.session_id IS DISTINCT FROM _session_evict.except_session
                 ORDER BY s.last_seen_at, s.created_at, s.session_id DESC
                 LIMIT need
                   FOR UPDATE);
            EXIT WHEN cardinality(victims) = 0;
        END IF;
        -- Locked above and checked again on the latest version: still this user's and valid.
        FOR sid IN
            UPDATE keel.sessions s
               SET revoked_at = now(), revoke_reason = 'evicted',
                   expires_at = least(s.expires_at, now())
             WHERE s.session_id = ANY (victims)
            RETURNING s.session_id
        LOOP
            evicted := evicted + 1;
            PERFORM keel._session_revoked(sid, _session_evict.user_id, 'evicted');
        END LOOP;
    END LOOP;
    RETURN evicted;
END
$$;

CREATE FUNCTION keel._check_max_per_user(user_id text, max_per_user integer)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF max_per_user IS NULL THEN
        RETURN;
    END IF;
    IF max_per_user < 1 OR max_per_user > 10000 THEN
        PERFORM keel._invalid_argument('max_per_user',
                                  'must be 1 to 10000 (or NULL for no cap)');
    END IF;
    IF user_id IS NULL THEN
        PERFORM keel._invalid_argument('max_per_user',
                                  'needs a user_id: an anonymous session has no user to cap');
    END IF;
END
$$;

CREATE FUNCTION keel.session_create(
    user_id text,
    ttl interval DEFAULT '30 days',
    idle_timeout interval DEFAULT NULL,
    data jsonb DEFAULT '{}',
    max_per_user integer DEFAULT NULL)
RETURNS TABLE (session_id uuid, token text, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_token text;
    new_id uuid;
    new_expires timestamptz;
BEGIN
    -- NULL: an anonymous session (a cart, a consent choice), bound later by session_login.
    IF session_create.user_id = '' OR length(session_create.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id',
                                  'must be 1 to 1024 characters (or NULL for an anonymous session)');
    END IF;
    PERFORM keel._check_interval('ttl', session_create.ttl);
    PERFORM keel._check_interval('idle_timeout', session_create.idle_timeout);
    IF session_create.ttl IS NULL OR session_create.ttl <= interval '0' THEN
        PERFORM keel._invalid_argument('ttl', 'must be a positive interval');
    END IF;
    IF session_create.idle_timeout <= interval '0' THEN
        PERFORM keel._invalid_argument('idle_timeout',
                                  'must be a positive interval (or NULL for none)');
    END IF;
    IF session_create.idle_timeout > session_create.ttl THEN
        PERFORM keel._invalid_argument('idle_timeout',
                                  'must not be longer than ttl (it could never apply)');
    END IF;
    PERFORM keel._check_session_data(session_create.data);
    PERFORM keel._check_max_per_user(session_create.user_id, session_create.max_per_user);
    new_token := keel._session_token();
    -- At the cap: the least recently seen give way to this one.
    IF session_create.max_per_user IS NOT NULL THEN
        PERFORM keel._session_evict(session_create.user_id, session_create.max_per_user - 1,
                                    now() + session_create.ttl);
    END IF;
    INSERT INTO keel.sessions AS s (token_hash, user_id, data, expires_at, idle_timeout,
                                    idle_expires_at, idle_check_at)
    VALUES (keel._session_hash(new_token), session_create.user_id, session_create.data,
            now() + session_create.ttl, session_create.idle_timeout,
            now() + session_create.idle_timeout, now() + session_create.idle_timeout)
    RETURNING s.session_id, s.expires_at INTO new_id, new_expires;
    PERFORM keel._session_event('keel.session_created',
        jsonb_build_object('session_id', new_id, 'user_id', session_create.user_id,
                           'expires_at', new_expires),
        session_create.user_id);
    RETURN QUERY SELECT new_id, new_token, new_expires;
END
$$;

-- The per-request read: native (src/session/mod.rs, keel_session_validate), returning its one
-- row in materialize mode. Not STRICT: NULL is a caller's bug (22023), a malformed token no row.
CREATE FUNCTION keel.session_validate(token text)
RETURNS TABLE (
    session_id       uuid,
    user_id          text,
    data             jsonb,
    created_at       timestamptz,
    expires_at       timestamptz,
    idle_expires_at  timestamptz)
VOLATILE PARALLEL UNSAFE ROWS 1
LANGUAGE c AS 'MODULE_PATHNAME', 'keel_session_validate';

-- Replaces the session's data, or with merge (the default) adds the given top-level keys to
-- it (jsonb ||). False when the token has no valid session.
CREATE FUNCTION keel.session_set_data(token text, data jsonb, merge boolean DEFAULT true)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_set_data.token);
    merged jsonb;
BEGIN
    PERFORM keel._check_session_data(session_set_data.data);
    IF session_set_data.merge IS NULL THEN
        PERFORM keel._invalid_argument('merge', 'must not be NULL');
    END IF;
    UPDATE keel.sessions s
       SET data = CASE WHEN session_set_data.merge THEN s.data || session_set_data.data
                       ELSE session_set_data.data END
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.data INTO merged;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._check_payload(keel._raw_bytes(merged));
    RETURN true;
END
$$;

-- Same session, new token. Without a grace the old token stops working when this commits;
-- with one, it keeps validating until the grace ends (requests already in flight), and a
-- second rotation of it meanwhile returns the same new token instead of forking the session
-- (two requests that both rotate). Only the token just replaced has a grace. NULL when the
-- token has no valid session. Expiry stays; the session counts as seen now.
CREATE FUNCTION keel.session_rotate(token text, grace interval DEFAULT '0')
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_rotate.token);
    new_token text := keel._session_token();
    graced boolean;
    sid uuid;
    uid text;
    sealed bytea;
BEGIN
    PERFORM keel._check_interval('grace', session_rotate.grace);
    IF session_rotate.grace IS NULL OR session_rotate.grace < interval '0'
       OR session_rotate.grace > interval '1 hour' THEN
        PERFORM keel._invalid_argument('grace',
                                  'must be zero to 1 hour (the time requests in flight need)');
    END IF;
    graced := session_rotate.grace > interval '0';
    -- A new token hash is a new index entry anyway (not HOT): the idle check moves too.
    UPDATE keel.sessions s
       SET token_hash = keel._session_hash(new_token),
           previous_hash = CASE WHEN graced THEN hash END,
           previous_until = CASE WHEN graced THEN least(s.expires_at, now() + session_rotate.grace) END,
           rotated_to = CASE WHEN graced THEN keel._session_seal(session_rotate.token, new_token) END,
           last_seen_at = now(),
           idle_expires_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                  ELSE least(s.expires_at, now() + s.idle_timeout) END,
           idle_check_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                ELSE least(s.expires_at, now() + s.idle_timeout) END
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.session_id, s.user_id INTO sid, uid;
    IF FOUND THEN
        PERFORM keel._session_revoked(sid, uid, 'rotated');
        RETURN new_token;
    END IF;
    -- Rotated away already, inside that rotation's grace: its new token (a rotation that
    -- waited for that one's row lock gets here too, once it committed).
    SELECT s.rotated_to INTO sealed FROM keel.sessions s
     WHERE s.previous_hash = hash AND s.previous_until > now() AND s.revoked_at IS NULL
       AND s.expires_at > now() AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now());
    IF sealed IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN keel._session_unseal(session_rotate.token, sealed);
END
$$;

-- Login on an existing session: binds user_id (an anonymous session's first user, or
-- another) and rotates the token in the same step, so a token planted before the login
-- (session fixation) is worth nothing after it. The old token stops working when this
-- commits (no grace); expiry stays, and data too unless the session was another user's.
-- NULL when the token has no valid session.
CREATE FUNCTION keel.session_login(token text, user_id text, max_per_user integer DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_login.token);
    new_token text := keel._session_token();
    sid uuid;
    before text;
    ends timestamptz;
BEGIN
    IF session_login.user_id IS NULL OR session_login.user_id = ''
       OR length(session_login.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    PERFORM keel._check_max_per_user(session_login.user_id, session_login.max_per_user);
    -- A capped login takes the user's lock before the session's row, as session_create
    -- does, so the two never wait for each other in opposite orders.
    IF session_login.max_per_user IS NOT NULL THEN
        PERFORM keel._lock_session_user(session_login.user_id, now());
    END IF;
    SELECT s.session_id, s.user_id, s.expires_at INTO sid, before, ends FROM keel.sessions s
     WHERE s.token_hash = hash AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF session_login.max_per_user IS NOT NULL THEN
        PERFORM keel._session_evict(session_login.user_id, session_login.max_per_user - 1,
                                    ends, except_session => sid);
    END IF;
    -- Another user's session: what it carried (roles, MFA flags) was theirs, not the new
    -- user's; an anonymous session keeps its data (a cart), as does the same user's.
    UPDATE keel.sessions s
       SET user_id = session_login.user_id,
           data = CASE WHEN before IS NOT NULL AND before <> session_login.user_id
                       THEN '{}'::jsonb ELSE s.data END,
           token_hash = keel._session_hash(new_token),
           previous_hash = NULL, previous_until = NULL, rotated_to = NULL,
           last_seen_at = now(),
           idle_expires_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                  ELSE least(s.expires_at, now() + s.idle_timeout) END,
           idle_check_at = CASE WHEN s.idle_timeout IS NULL THEN NULL
                                ELSE least(s.expires_at, now() + s.idle_timeout) END
     WHERE s.session_id = sid;
    -- The old token is gone: as for a rotation, under the user it belonged to (if any).
    PERFORM keel._session_revoked(sid, coalesce(before, session_login.user_id), 'rotated');
    PERFORM keel._session_event('keel.session_login',
        jsonb_build_object('session_id', sid, 'user_id', session_login.user_id,
                           'previous_user_id', before),
        session_login.user_id);
    RETURN new_token;
END
$$;

-- Revocation ends the session now: expires_at moves to now() too, so the cleanup's expiry
-- index finds it. True when a valid session was revoked.
CREATE FUNCTION keel.session_revoke(token text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea := keel._session_hash(session_revoke.token);
    sid uuid;
    uid text;
BEGIN
    -- The current token, or one rotated away inside its grace (a logout sent with it).
    UPDATE keel.sessions s
       SET revoked_at = now(), revoke_reason = 'revoked', expires_at = least(s.expires_at, now())
     WHERE (s.token_hash = hash OR (s.previous_hash = hash AND s.previous_until > now()))
       AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.session_id, s.user_id INTO sid, uid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._session_revoked(sid, uid, 'revoked');
    RETURN true;
END
$$;

CREATE FUNCTION keel.session_revoke_id(session_id uuid)
RETURNS boolean
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    uid text;
BEGIN
    IF session_revoke_id.session_id IS NULL THEN
        PERFORM keel._invalid_argument('session_id', 'must not be NULL');
    END IF;
    UPDATE keel.sessions s
       SET revoked_at = now(), revoke_reason = 'revoked', expires_at = least(s.expires_at, now())
     WHERE s.session_id = session_revoke_id.session_id AND s.revoked_at IS NULL
       AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
    RETURNING s.user_id INTO uid;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM keel._session_revoked(session_revoke_id.session_id, uid, 'revoked');
    RETURN true;
END
$$;

-- "Log out everywhere" (or everywhere else, with except_session). Returns how many
-- sessions it revoked.
CREATE FUNCTION keel.session_revoke_user(user_id text, except_session uuid DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    sid uuid;
    revoked integer := 0;
BEGIN
    IF session_revoke_user.user_id IS NULL OR session_revoke_user.user_id = ''
       OR length(session_revoke_user.user_id) > 1024 THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    -- After a capped login in progress, not beside it (its evictions lock the same rows),
    -- even the user's first: the user's lock, taken as those logins take it.
    PERFORM keel._lock_session_user(session_revoke_user.user_id, now());
    FOR sid IN
        UPDATE keel.sessions s
           SET revoked_at = now(), revoke_reason = 'revoked_user',
               expires_at = least(s.expires_at, now())
         WHERE s.user_id = session_revoke_user.user_id AND s.revoked_at IS NULL
           AND s.expires_at > now()
           AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
           AND s.session_id IS DISTINCT FROM session_revoke_user.except_session
        RETURNING s.session_id
    LOOP
        revoked := revoked + 1;
        PERFORM keel._session_revoked(sid, session_revoke_user.user_id, 'revoked_user');
    END LOOP;
    RETURN revoked;
END
$$;

-- A user's valid sessions, most recently seen first ("your devices"). Never the token hash.
CREATE FUNCTION keel.user_sessions(user_id text)
RETURNS TABLE (session_id uuid, created_at timestamptz, last_seen_at timestamptz,
               expires_at timestamptz, idle_expires_at timestamptz, data jsonb)
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF user_sessions.user_id IS NULL OR user_sessions.user_id = '' THEN
        PERFORM keel._invalid_argument('user_id', 'must be 1 to 1024 characters');
    END IF;
    RETURN QUERY
    SELECT s.session_id, s.created_at, s.last_seen_at, s.expires_at, s.idle_expires_at, s.data
      FROM keel.sessions s
     WHERE s.user_id = user_sessions.user_id AND s.revoked_at IS NULL AND s.expires_at > now()
       AND (s.idle_expires_at IS NULL OR s.idle_expires_at > now())
     ORDER BY s.last_seen_at DESC, s.session_id;
END
$$;

-- One batch of the cleanup: deletes sessions that ended (expired, revoked, or idle-expired)
-- more than keel.session_cleanup_grace ago, looking at most at max_rows sessions, skipping
-- rows anyone holds. Expired and revoked ones come from the expiry index; idle-expired ones
-- from the idle-check index: a session found there idle-expired is deleted, one touched since
-- has its check moved to its current idle expiry (`rechecked`). Both indexes are read in
-- order, so a batch costs its rows, whatever the size of the table. Rotations whose grace has
-- ended are cleared first (counted in `rechecked`), then the lock rows of capped users whose
-- capped sessions have all ended (`rechecked` too), and one-time tokens expired as long ago
-- fill what is left of the batch (counted in `deleted`). With keel.session_events =
-- lifecycle, each deleted session that ended on its own emits keel.session_expired.
CREATE FUNCTION keel._cleanup_sessions(max_rows integer, OUT deleted bigint, OUT rechecked bigint)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    horizon timestamptz := clock_timestamp() - keel._session_cleanup_grace();
    lifecycle boolean := keel._session_lifecycle();
    idle bigint;
    tokens bigint;
    cleared bigint;
    users bigint;
    ended jsonb[];
    idled jsonb[];
    ev jsonb;
BEGIN
    IF _cleanup_sessions.max_rows IS NULL OR _cleanup_sessions.max_rows < 1 THEN
        PERFORM keel._invalid_argument('max_rows', 'must be at least 1');
    END IF;
    -- Rotations whose grace has ended, first (cheap, and they must not wait behind churn):
    -- the old token's hash and the sealed new token go, so an old token and a copy of the
    -- table no longer give the current token.
    UPDATE keel.sessions s
       SET previous_hash = NULL, previous_until = NULL, rotated_to = NULL
     WHERE s.session_id IN (
        SELECT x.session_id FROM keel.sessions x
         WHERE x.previous_hash IS NOT NULL AND x.previous_until <= clock_timestamp()
         LIMIT _cleanup_sessions.max_rows
           FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS cleared = ROW_COUNT;
    rechecked := 0;
    -- With lifecycle events, the sessions that ended on their own (not revoked: those had
    -- their event at the revocation) are collected for keel.session_expired.
    WITH gone AS (
        DELETE FROM keel.sessions s
         WHERE s.session_id IN (
            SELECT x.session_id FROM keel.sessions x
             WHERE x.expires_at < horizon
             ORDER BY x.expires_at
             LIMIT _cleanup_sessions.max_rows
               FOR UPDATE SKIP LOCKED)
        RETURNING s.session_id, s.user_id, s.revoked_at, s.expires_at, s.idle_expires_at)
    SELECT count(*),
           array_agg(keel._session_expired(g.session_id, g.user_id, g.expires_at, g.idle_expires_at))
               FILTER (WHERE lifecycle AND g.revoked_at IS NULL)
      INTO deleted, ended FROM gone g;
    IF deleted < _cleanup_sessions.max_rows THEN
        WITH due AS (
            SELECT x.session_id FROM keel.sessions x
             WHERE x.idle_check_at < horizon
             ORDER BY x.idle_check_at
             LIMIT _cleanup_sessions.max_rows - deleted
               FOR UPDATE SKIP LOCKED),
        gone AS (
            DELETE FROM keel.sessions s USING due
             WHERE s.session_id = due.session_id
               AND (s.idle_expires_at < horizon OR s.expires_at < horizon)
            RETURNING s.session_id, s.user_id, s.revoked_at, s.expires_at, s.idle_expires_at),
        moved AS (
            UPDATE keel.sessions s SET idle_check_at = s.idle_expires_at
              FROM due
             WHERE s.session_id = due.session_id
               AND NOT (coalesce(s.idle_expires_at < horizon, false) OR s.expires_at < horizon)
            RETURNING 1)
        SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM moved),
               (SELECT array_agg(keel._session_expired(g.session_id, g.user_id, g.expires_at,
                                                       g.idle_expires_at))
                  FROM gone g WHERE lifecycle AND g.revoked_at IS NULL)
          INTO idle, rechecked, idled;
        deleted := deleted + idle;
    END IF;
    -- One event per session, and the last: no per-user order (and lock) to keep.
    FOREACH ev IN ARRAY coalesce(ended, '{}') || coalesce(idled, '{}') LOOP
        PERFORM keel.emit('keel.session_expired', ev);
    END LOOP;
    rechecked := rechecked + cleared;
    -- The lock rows of capped users whose capped sessions have all ended (counted with the
    -- rechecked: the batch's work, not sessions).
    IF deleted + rechecked < _cleanup_sessions.max_rows THEN
        DELETE FROM keel.session_users u
         WHERE u.user_id IN (
            SELECT x.user_id FROM keel.session_users x
             WHERE x.until < horizon
             ORDER BY x.until
             LIMIT _cleanup_sessions.max_rows - deleted - rechecked
               FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS users = ROW_COUNT;
        rechecked := rechecked + users;
    END IF;
    -- One-time tokens expired as long ago, in the same batch.
    IF deleted + rechecked < _cleanup_sessions.max_rows THEN
        DELETE FROM keel.tokens t
         WHERE t.token_hash IN (
            SELECT x.token_hash FROM keel.tokens x
             WHERE x.expires_at < horizon
             ORDER BY x.expires_at
             LIMIT _cleanup_sessions.max_rows - deleted - rechecked
               FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS tokens = ROW_COUNT;
        deleted := deleted + tokens;
    END IF;
END
$$;

-- The cleanup task by hand: one batch; returns how many sessions it deleted. Sessions in use
-- whose idle check came due are rechecked in the same batch and not counted (the scheduled
-- task runs another batch while one is full of either).
CREATE FUNCTION keel.cleanup_sessions(max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT deleted FROM keel._cleanup_sessions(max_rows) $$;

-- One-time tokens (0.2.0): email verification, password reset, magic links. Made like session
-- tokens (32 random bytes, base64url) and stored only as their SHA-256, with the purpose they
-- were made for; keel.token_consume deletes the row it returns, so a token is consumed once
-- whatever the concurrency (the row lock queues the others, which then find no row).
CREATE TABLE keel.tokens (
    token_hash  bytea       PRIMARY KEY,
    purpose     text        NOT NULL,
    subject     text        NOT NULL,
    data        jsonb       NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CONSTRAINT tokens_token_hash_sha256 CHECK (octet_length(token_hash) = 32)
);
-- Cleanup by expiry; token_revoke by purpose and subject.
CREATE INDEX tokens_expires_idx ON keel.tokens (expires_at);
CREATE INDEX tokens_subject_idx ON keel.tokens (purpose, subject);

SELECT pg_catalog.pg_extension_config_dump('keel.tokens', '');

CREATE FUNCTION keel._check_token_purpose(purpose text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF purpose IS NULL OR purpose !~ '^[a-z0-9][a-z0-9_.-]{0,62}$' THEN
        PERFORM keel._invalid_argument('purpose',
            '1 to 63 characters: lower-case letters, digits, ''_'', ''.'' and ''-'', starting with a letter or digit');
    END IF;
END
$$;

CREATE FUNCTION keel.token_create(purpose text, subject text, ttl interval, data jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    new_token text;
BEGIN
    PERFORM keel._check_token_purpose(token_create.purpose);
    IF token_create.subject IS NULL OR token_create.subject = ''
       OR length(token_create.subject) > 1024 THEN
        PERFORM keel._invalid_argument('subject', 'must be 1 to 1024 characters');
    END IF;
    PERFORM keel._check_interval('ttl', token_create.ttl);
    IF token_create.ttl IS NULL OR token_create.ttl <= interval '0' THEN
        PERFORM keel._invalid_argument('ttl', 'must be a positive interval');
    END IF;
    PERFORM keel._check_session_data(token_create.data);
    new_token := keel._session_token();
    INSERT INTO keel.tokens (token_hash, purpose, subject, data, expires_at)
    VALUES (keel._session_hash(new_token), token_create.purpose, token_create.subject,
            token_create.data, now() + token_create.ttl);
    RETURN new_token;
END
$$;

-- The token's subject and data, once: the row is deleted as it is returned. No row when the
-- token is unknown, malformed, already consumed, expired or made for another purpose (which
-- it then stays valid for).
CREATE FUNCTION keel.token_consume(purpose text, token text)
RETURNS TABLE (subject text, data jsonb)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    hash bytea;
BEGIN
    PERFORM keel._check_token_purpose(token_consume.purpose);
    IF token_consume.token IS NULL THEN
        PERFORM keel._invalid_argument('token', 'must not be NULL');
    END IF;
    hash := keel._token_hash(token_consume.token);
    IF hash IS NULL THEN
        RETURN;  -- malformed: no such token
    END IF;
    RETURN QUERY
    DELETE FROM keel.tokens t
     WHERE t.token_hash = hash AND t.purpose = token_consume.purpose AND t.expires_at > now()
    RETURNING t.subject, t.data;
END
$$;

-- Withdraws every outstanding token of a purpose for a subject (a password changed: the
-- reset links already sent stop working). Returns how many.
CREATE FUNCTION keel.token_revoke(purpose text, subject text)
RETURNS integer
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    deleted integer;
BEGIN
    PERFORM keel._check_token_purpose(token_revoke.purpose);
    IF token_revoke.subject IS NULL THEN
        PERFORM keel._invalid_argument('subject', 'must not be NULL');
    END IF;
    DELETE FROM keel.tokens t
     WHERE t.purpose = token_revoke.purpose AND t.subject = token_revoke.subject;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
