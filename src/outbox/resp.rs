//! A small Redis client whose replies are strictly bounded: RESP2 over TCP, TLS or a unix
//! socket, for the outbox dispatcher.
//!
//! Why it exists: redis-rs trusts the lengths a server announces and has no way to bound a
//! reply. A reply announcing `$9999999999` and then streaming bytes made it buffer ~600 MB and
//! abort the worker (and with it the cluster) on "memory allocation of 4294967296 bytes
//! failed". Here every reply is bounded by [`Limits`]:
//! - in size: the bytes read for the whole reply (lines, bulk payloads, nested headers) plus
//!   the in-memory size of each value count against `max_reply_bytes`. A length a server
//!   announces is checked against what is left before anything is allocated, and buffers only
//!   grow as bytes actually arrive;
//! - in the number of array elements (all arrays of a reply together), in nesting depth, and
//!   in line length (64 KiB);
//! - in time: `reply_timeout` for the whole reply (a server dribbling one byte at a time still
//!   times out), `io_timeout` for each read and write, `connect_timeout` for connecting.
//!
//! Whatever a server sends, malformed RESP is an `Err(String)`, never a panic. After any
//! `Err` the connection is poisoned (every later call fails): drop it and connect again. A
//! server's error reply (`-WRONGTYPE ...`) is not an `Err` but [`Value::Error`].
//!
//! Supported: RESP2 replies (`+ - : $ *`, and the RESP3 null `_`; other RESP3 types are
//! refused, we never send `HELLO 3`), commands as arrays of bulk strings, pipelining (send
//! several commands, then receive as many replies), `AUTH` and `SELECT` on connect, TLS with
//! rustls (verified against a CA file or the system roots, or unverified for tests, with an
//! optional client certificate), and the URL forms of redis-rs (see [`parse_url`]). Not
//! supported: RESP3, pub/sub, cluster, sentinel, TLS over unix sockets.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Longest line (simple string, error, integer, length header) accepted, without its CRLF.
const MAX_LINE: usize = 64 * 1024;
/// The read buffer: one line and its CRLF always fit; bulk strings pass through it in chunks.
const READ_BUFFER: usize = MAX_LINE + 2;
/// Simple strings and errors are cut to this many characters.
const MAX_TEXT_CHARS: usize = 1000;
/// What each value costs the reply budget besides its bytes on the wire.
const VALUE_SIZE: usize = std::mem::size_of::<Value>();
/// The fewest bytes an array element takes on the wire (`_\r\n`).
const MIN_ELEMENT_BYTES: usize = 3;
const DEFAULT_PORT: u16 = 6379;

/// Bounds on every reply and on each step of talking to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes read for one reply plus the in-memory size of its values.
    pub max_reply_bytes: usize,
    /// Array elements in one reply, all arrays together.
    pub max_elements: usize,
    /// Arrays nested in one reply (a flat array is depth 1).
    pub max_depth: usize,
    /// Connecting over TCP, all resolved addresses together.
    pub connect_timeout: Duration,
    /// Each read and each write.
    pub io_timeout: Duration,
    /// A whole reply, from the start of `receive` to its last byte; also bounds sending one
    /// command (with `io_timeout` if that is longer) and the TLS handshake.
    pub reply_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_reply_bytes: 64 * 1024 * 1024,
            max_elements: 1_000_000,
            max_depth: 8,
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(5),
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `$-1`, `*-1` or RESP3 `_`.
    Nil,
    Int(i64),
    /// `+...`, cut to 1000 characters.
    Simple(String),
    Bulk(Vec<u8>),
    Array(Vec<Value>),
    /// A server error reply (`-WRONGTYPE ...`), cut to 1000 characters.
    Error(String),
}

impl Value {
    /// A short description (at most 200 characters) for logs and messages.
    pub fn describe(&self) -> String {
        let text = match self {
            Value::Nil => "nil".to_string(),
            Value::Int(n) => format!("integer {n}"),
            Value::Simple(s) => format!("status {:?}", cut(s, 200)),
            Value::Bulk(b) => {
                let head = String::from_utf8_lossy(b.get(..160).unwrap_or(b));
                format!("bulk string of {} bytes {:?}", b.len(), head)
            }
            Value::Array(items) => format!("array of {} elements", items.len()),
            Value::Error(e) => format!("error {:?}", cut(e, 200)),
        };
        cut(&text, 200)
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Int(_) => "integer",
            Value::Simple(_) => "status",
            Value::Bulk(_) => "bulk string",
            Value::Array(_) => "array",
            Value::Error(_) => "error",
        }
    }
}

/// `s` cut to at most `max` characters (the last one an ellipsis when cut).
fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `host` is a name, an IPv4 address or an IPv6 address without brackets.
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// A parsed Redis URL. Its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    pub address: Address,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

impl fmt::Debug for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Url")
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

/// TLS settings, used when the URL is `rediss://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM bundle of the CAs to trust; the system's roots when `None`.
    pub ca_file: Option<PathBuf>,
    /// `false`: encrypt but accept any certificate and host name. For testing only: anyone on
    /// the network path can then impersonate the server.
    pub verify: bool,
    /// PEM client certificate chain and its key, for servers that require one (both or none).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for Tls {
    fn default() -> Tls {
        Tls {
            ca_file: None,
            verify: true,
            cert_file: None,
            key_file: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------------------------

/// The pieces of a URL, as slices of its text (nothing decoded or validated but the scheme).
struct Parts<'a> {
    scheme: &'a str,
    /// `None` for a unix socket, else whether it is TLS.
    tls: Option<bool>,
    /// Whether `//` followed the scheme.
    slashes: bool,
    userinfo: Option<&'a str>,
    host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

fn split(url: &str) -> Result<Parts<'_>, String> {
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            "the redis URL contains spaces or control characters (percent-encode them)".into(),
        );
    }
    let (scheme, rest) = url.split_once(':').ok_or(
        "not a redis URL: it must start with redis://, rediss://, redis+unix:// or unix://",
    )?;
    let tls =
        match scheme.to_ascii_lowercase().as_str() {
            "redis" | "valkey" => Some(false),
            "rediss" | "valkeys" => Some(true),
            "redis+unix" | "valkey+unix" | "unix" => None,
            "rediss+unix" | "valkeys+unix" => {
                return Err(
                    "TLS over a unix socket is not supported: use redis+unix:// or unix://".into(),
                )
            }
            _ => return Err(
                "unsupported redis URL scheme: use redis://, rediss://, redis+unix:// or unix://"
                    .into(),
            ),
        };
    if rest.contains('#') {
        return Err(
            "a redis URL cannot have a #fragment (percent-encode # in a password as %23; \
                    for unverified TLS use the TLS settings, not #insecure)"
                .into(),
        );
    }
    let (rest, slashes) = match rest.strip_prefix("//") {
        Some(r) => (r, true),
        None if tls.is_none() => (rest, false),
        None => return Err("a redis URL looks like redis://host:port/db".into()),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = if slashes {
        before_query.split_at(before_query.find('/').unwrap_or(before_query.len()))
    } else {
        ("", before_query)
    };
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    Ok(Parts {
        scheme,
        tls,
        slashes,
        userinfo,
        host,
        path,
        query,
    })
}

/// Parses a Redis URL, in the forms redis-rs accepts:
/// - `redis://[[user]:[password]@]host[:port][/db]` (`rediss://` for TLS; `valkey://` and
///   `valkeys://` too). User and password are percent-decoded (`%40` for `@`); an IPv6 host
///   goes in brackets (`[::1]:6379`); the port defaults to 6379 and the database to 0. The
///   only query parameter allowed is `protocol=resp2`;
/// - `redis+unix:///path/to/redis.sock?db=N&user=U&pass=P` (also `unix://` and
///   `valkey+unix://`; `password` works as well as `pass`). Query values are
///   form-decoded (`%XX`, and `+` for a space).
///
/// Errors never repeat any part of the URL, so never the password.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let parts = split(url.trim())?;
    let params = query_params(parts.query)?;
    match parts.tls {
        Some(tls) => {
            let (host, port) = host_port(parts.host)?;
            let (username, password) = userinfo(parts.userinfo)?;
            let db = db_number(parts.path.trim_matches('/'))?;
            for (key, value) in &params {
                match key.as_str() {
                    "protocol" => protocol(value)?,
                    "db" | "user" | "pass" | "password" => {
                        return Err("in a redis:// URL the database goes in the path \
                                    (redis://host/2) and user and password before the host \
                                    (redis://user:password@host), not in the query"
                            .into())
                    }
                    _ => {
                        return Err("unknown query parameter in the redis URL (a redis:// URL \
                                    only takes protocol=resp2)"
                            .into())
                    }
                }
            }
            Ok(Url {
                address: Address::Tcp { host, port },
                tls,
                username,
                password,
                db,
            })
        }
        None => {
            if parts.userinfo.is_some() {
                return Err("a unix socket URL takes user and password in its query \
                            (unix:///path?user=U&pass=P), not before an @"
                    .into());
            }
            if !(parts.host.is_empty() || parts.host.eq_ignore_ascii_case("localhost")) {
                return Err(
                    "a unix socket URL has no host: write unix:///path/to/redis.sock".into(),
                );
            }
            let path = percent_decode(parts.path, false);
            if !path.starts_with(b"/") || path.len() < 2 || path.contains(&0) {
                return Err(
                    "a unix socket URL needs an absolute socket path: unix:///path/to/redis.sock"
                        .into(),
                );
            }
            let mut url = Url {
                address: Address::Unix(PathBuf::from(std::ffi::OsStr::from_bytes(&path))),
                tls: false,
                username: None,
                password: None,
                db: 0,
            };
            let (mut seen_db, mut seen_user, mut seen_pass) = (false, false, false);
            for (key, value) in params {
                let seen = match key.as_str() {
                    "db" => {
                        url.db = db_number(&value)?;
                        &mut seen_db
                    }
                    "user" => {
                        url.username = Some(value).filter(|v| !v.is_empty());
                        &mut seen_user
                    }
                    "pass" | "password" => {
                        url.password = Some(value).filter(|v| !v.is_empty());
                        &mut seen_pass
                    }
                    "protocol" => {
                        protocol(&value)?;
                        continue;
                    }
                    _ => {
                        return Err("unknown query parameter in the redis URL (a unix socket \
                                    URL takes db, user, pass or password, and protocol)"
                            .into())
                    }
                };
                if *seen {
                    return Err(
                        "a query parameter is given twice in the redis URL (db, user, or \
                         pass/password)"
                            .into(),
                    );
                }
                *seen = true;
            }
            Ok(url)
        }
    }
}

/// `url` with its password replaced by `***` (`user:***@`, `***@`, `pass=***`), for logs and
/// views. A URL that [`parse_url`] refuses gives `<unparsable redis url>`.
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    let (Ok(parts), Ok(_)) = (split(url), parse_url(url)) else {
        return "<unparsable redis url>".into();
    };
    let mut out = format!("{}:", parts.scheme);
    if parts.slashes {
        out.push_str("//");
    }
    match parts.userinfo {
        None => {}
        Some(info) => match info.split_once(':') {
            Some(("", _)) => out.push_str("***@"),
            Some((user, _)) => {
                out.push_str(user);
                out.push_str(":***@");
            }
            None => {
                out.push_str(info);
                out.push('@');
            }
        },
    }
    out.push_str(parts.host);
    out.push_str(parts.path);
    if let Some(query) = parts.query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_password_key(key) => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

fn is_password_key(key: &str) -> bool {
    let key = percent_decode(key, true);
    key == b"pass" || key == b"password"
}

/// The `key=value` pairs of a query, form-decoded; empty pairs skipped.
fn query_params(query: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = String::from_utf8(percent_decode(key, true))
            .map_err(|_| "a query parameter name in the redis URL is not valid UTF-8")?;
        let value = String::from_utf8(percent_decode(value, true))
            .map_err(|_| "a query parameter value in the redis URL is not valid UTF-8")?;
        out.push((key, value));
    }
    Ok(out)
}

fn protocol(value: &str) -> Result<(), String> {
    match value.to_ascii_lowercase().as_str() {
        "2" | "resp2" => Ok(()),
        "3" | "resp3" => Err("protocol=resp3 is not supported: this client speaks RESP2".into()),
        _ => Err("unknown protocol in the redis URL (only protocol=resp2 is supported)".into()),
    }
}

fn host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or("unterminated [ in the redis URL host (IPv6 is written [::1]:6379)")?;
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| "invalid IPv6 address in brackets in the redis URL")?;
        if ip.is_unspecified() {
            return Err("cannot connect to a wildcard address (::)".into());
        }
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("unexpected text after ] in the redis URL host")?,
            ),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        };
        if host.is_empty() {
            return Err("the redis URL has no host".into());
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
        if !host.chars().all(valid) {
            return Err(
                "invalid host in the redis URL (letters, digits, '-', '.', '_', or \
                        an IPv6 address in brackets)"
                    .into(),
            );
        }
        if host == "0.0.0.0" {
            return Err("cannot connect to a wildcard address (0.0.0.0)".into());
        }
        (host.to_string(), port)
    };
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or("invalid port in the redis URL (it must be a number from 1 to 65535)")?,
    };
    Ok((host, port))
}

fn userinfo(info: Option<&str>) -> Result<(Option<String>, Option<String>), String> {
    let Some(info) = info else {
        return Ok((None, None));
    };
    let (user, password) = match info.split_once(':') {
        Some((u, p)) => (u, Some(p)),
        None => (info, None),
    };
    let user = String::from_utf8(percent_decode(user, false))
        .map_err(|_| "the user name in the redis URL is not valid UTF-8")?;
    let password = match password {
        Some(p) => Some(
            String::from_utf8(percent_decode(p, false))
                .map_err(|_| "the password in the redis URL is not valid UTF-8")?,
        ),
        None => None,
    };
    Ok((
        Some(user).filter(|u| !u.is_empty()),
        password.filter(|p| !p.is_empty()),
    ))
}

fn db_number(text: &str) -> Result<i64, String> {
    if text.is_empty() {
        return Ok(0);
    }
    text.parse::<i64>()
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| "invalid database number in the redis URL (a non-negative integer)".into())
}

/// Decodes `%XX` (a `%` not followed by two hex digits stays as it is, as in redis-rs), and `+`
/// to a space when `plus_is_space` (query strings).
fn percent_decode(text: &str, plus_is_space: bool) -> Vec<u8> {
    let hex = |b: &u8| (*b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.as_bytes().iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'%' => {
                let rest = bytes.as_slice();
                match (rest.first().and_then(hex), rest.get(1).and_then(hex)) {
                    (Some(high), Some(low)) => {
                        out.push(high * 16 + low);
                        bytes.nth(1);
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            _ => out.push(b),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// A command being assembled: `Command::new("SET").arg(key).arg_int(42)`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Command(Vec<Vec<u8>>);

impl Command {
    pub fn new(name: impl AsRef<[u8]>) -> Command {
        Command(vec![name.as_ref().to_vec()])
    }

    pub fn arg(&mut self, arg: impl AsRef<[u8]>) -> &mut Command {
        self.0.push(arg.as_ref().to_vec());
        self
    }

    pub fn arg_int(&mut self, n: i64) -> &mut Command {
        self.0.push(n.to_string().into_bytes());
        self
    }
}

/// The RESP encoding of a command: an array of bulk strings.
fn encode<'a>(args: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let (count, size) = args
        .clone()
        .fold((0usize, 16usize), |(n, s), a| (n + 1, s + a.len() + 24));
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(format!("*{count}\r\n").as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

/// `now + t`, or far away if that overflows.
fn deadline_after(t: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(t)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// How long the next read or write may wait: `io_timeout`, or less to keep `deadline`;
/// `None` once the deadline has passed.
fn wait_time(deadline: Instant, io_timeout: Duration) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    (!left.is_zero()).then(|| left.min(io_timeout).max(Duration::from_millis(1)))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A socket whose write timeout can be set.
trait Socket: Write {
    fn write_timeout(&self, t: Duration) -> io::Result<()>;
}

impl Socket for TcpStream {
    fn write_timeout(&self, t: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

impl Socket for UnixStream {
    fn write_timeout(&self, t: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(t))
    }
}

/// The connection to the server. TLS is driven record by record here rather than through
/// `rustls::StreamOwned`, whose `read` loops over socket reads internally and so could outlast
/// the reply deadline.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

struct TlsStream {
    tls: ClientConnection,
    sock: TcpStream,
}

/// Timing for one read or write: the deadline and the limits to explain a timeout with.
#[derive(Clone, Copy)]
struct Timing {
    deadline: Instant,
    io_timeout: Duration,
    overall: Duration,
}

impl Timing {
    fn wait(&self, doing: &str) -> Result<Duration, String> {
        wait_time(self.deadline, self.io_timeout)
            .ok_or_else(|| format!("{doing}: timed out (not done within {:?})", self.overall))
    }

    fn explain(&self, doing: &str, e: &io::Error) -> String {
        if is_timeout(e) {
            if wait_time(self.deadline, self.io_timeout).is_none() {
                format!("{doing}: timed out (not done within {:?})", self.overall)
            } else {
                format!("{doing}: timed out (nothing for {:?})", self.io_timeout)
            }
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("{doing}: the server closed the connection")
        } else {
            format!("{doing}: {e}")
        }
    }
}

impl Stream {
    /// Reads at least one byte into `buf`.
    fn read_some(&mut self, buf: &mut [u8], timing: Timing) -> Result<usize, String> {
        const DOING: &str = "reading a redis reply";
        loop {
            let wait = timing.wait(DOING)?;
            let step = match self {
                Stream::Tcp(s) => s
                    .set_read_timeout(Some(wait))
                    .and_then(|()| s.read(buf))
                    .map(Some),
                Stream::Unix(s) => s
                    .set_read_timeout(Some(wait))
                    .and_then(|()| s.read(buf))
                    .map(Some),
                Stream::Tls(s) => s.read_step(buf, wait),
            };
            match step {
                Ok(Some(0)) => return Err(format!("{DOING}: the server closed the connection")),
                Ok(Some(n)) => return Ok(n.min(buf.len())),
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timing.explain(DOING, &e)),
            }
        }
    }

    fn write_all(&mut self, data: &[u8], timing: Timing) -> Result<(), String> {
        match self {
            Stream::Tcp(s) => write_socket(s, data, timing),
            Stream::Unix(s) => write_socket(s, data, timing),
            Stream::Tls(s) => s.write_all(data, timing),
        }
    }
}

fn write_socket<S: Socket>(sock: &mut S, mut data: &[u8], timing: Timing) -> Result<(), String> {
    const DOING: &str = "sending a redis command";
    while !data.is_empty() {
        let wait = timing.wait(DOING)?;
        match sock.write_timeout(wait).and_then(|()| sock.write(data)) {
            Ok(0) => return Err(format!("{DOING}: the connection is closed")),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timing.explain(DOING, &e)),
        }
    }
    sock.flush().map_err(|e| timing.explain(DOING, &e))
}

impl TlsStream {
    /// One step of reading: `Some(n)` plaintext bytes (0: the server closed the session), or
    /// `None` when TLS records were read but no plaintext is available yet.
    fn read_step(&mut self, buf: &mut [u8], wait: Duration) -> io::Result<Option<usize>> {
        match self.tls.reader().read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // Answers rustls owes the server (key updates, alerts) go out first.
        self.sock.set_write_timeout(Some(wait))?;
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.sock)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        self.sock.set_read_timeout(Some(wait))?;
        // At EOF (0 bytes) rustls notes it, and the next `reader().read` says so.
        self.tls.read_tls(&mut self.sock)?;
        self.tls.process_new_packets().map_err(io::Error::other)?;
        Ok(None)
    }

    /// Sends the TLS records rustls has queued.
    fn flush_records(&mut self, timing: Timing, doing: &str) -> Result<(), String> {
        while self.tls.wants_write() {
            let wait = timing.wait(doing)?;
            let sent = self
                .sock
                .set_write_timeout(Some(wait))
                .and_then(|()| self.tls.write_tls(&mut self.sock));
            match sent {
                Ok(0) => return Err(format!("{doing}: the connection is closed")),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(timing.explain(doing, &e)),
            }
        }
        Ok(())
    }

    fn write_all(&mut self, mut data: &[u8], timing: Timing) -> Result<(), String> {
        const DOING: &str = "sending a redis command";
        loop {
            self.flush_records(timing, DOING)?;
            if data.is_empty() {
                return self.sock.flush().map_err(|e| timing.explain(DOING, &e));
            }
            let n = self
                .tls
                .writer()
                .write(data)
                .map_err(|e| timing.explain(DOING, &e))?;
            if n == 0 && !self.tls.wants_write() {
                return Err(format!("{DOING}: the TLS session takes no more data"));
            }
            data = data.get(n..).unwrap_or_default();
        }
    }

    fn handshake(&mut self, timing: Timing) -> Result<(), String> {
        const DOING: &str = "TLS handshake with redis";
        while self.tls.is_handshaking() {
            if self.tls.wants_write() {
                self.flush_records(timing, DOING)?;
                continue;
            }
            if !self.tls.wants_read() {
                return Err(format!("{DOING}: stalled"));
            }
            let wait = timing.wait(DOING)?;
            let got = self
                .sock
                .set_read_timeout(Some(wait))
                .and_then(|()| self.tls.read_tls(&mut self.sock));
            match got {
                Ok(0) => return Err(format!("{DOING}: the server closed the connection")),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(timing.explain(DOING, &e)),
            }
            self.tls
                .process_new_packets()
                .map_err(|e| format!("{DOING} failed: {e}"))?;
        }
        self.flush_records(timing, DOING)
    }
}

/// Accepts any server certificate; only the handshake signatures are checked (with the
/// provider's algorithms). For `Tls { verify: false, .. }`, which is for testing only.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read_certificates(
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("reading the {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading the {what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn tls_config(settings: &Tls) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("setting up TLS: {e}"))?;
    let builder = if settings.verify {
        let mut roots = RootCertStore::empty();
        match &settings.ca_file {
            Some(path) => {
                for cert in read_certificates(path, "CA file")? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("the CA file {}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default();
                    return Err(format!(
                        "no system CA certificates found to verify the redis server{why}; \
                         configure a CA file"
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    };
    match (&settings.cert_file, &settings.key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert, "client certificate file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("reading the client key file {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the client certificate or key: {e}"))
        }
        _ => Err("a TLS client certificate needs both a certificate file and a key file".into()),
    }
}

fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let shown = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let deadline = deadline_after(timeout);
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving the redis host {host}: {e}"))?
        .collect();
    let mut last = "no address".to_string();
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = "timed out".into();
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(sock) => return Ok(sock),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(format!(
        "could not connect to redis at {shown} within {timeout:?} ({last})"
    ))
}

// ---------------------------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------------------------

/// One connection. Not for sharing between threads; after any `Err` it refuses further use.
pub struct Conn {
    stream: Stream,
    limits: Limits,
    /// Bytes read but not yet parsed are `buf[start..end]`; `buf` never grows.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    poisoned: bool,
}

/// What is left to one reply.
struct Budget {
    timing: Timing,
    bytes: usize,
    elements: usize,
}

enum Header {
    Value(Value),
    Bulk(usize),
    Array(usize),
}

impl Budget {
    fn charge(&mut self, n: usize, limit: usize) -> Result<(), String> {
        self.bytes = self
            .bytes
            .checked_sub(n)
            .ok_or_else(|| format!("redis reply larger than {limit} bytes (max_reply_bytes)"))?;
        Ok(())
    }
}

impl Conn {
    /// Connects (each resolved address tried in turn, all within `connect_timeout`), does the
    /// TLS handshake if the URL says `rediss` (within `reply_timeout`), then `AUTH password`
    /// (or `AUTH user password`) if the URL has a password, and `SELECT db` if db is not 0. A
    /// server error there is an `Err` with the server's message (never the password).
    ///
    /// Host names are resolved by the system resolver, which no timeout here can cut short;
    /// connecting to a unix socket has no timeout either (it is local).
    pub fn connect(url: &Url, tls: &Tls, limits: Limits) -> Result<Conn, String> {
        let stream = match &url.address {
            Address::Tcp { host, port } => {
                let tls_setup = if url.tls {
                    let config = tls_config(tls)?;
                    let name = ServerName::try_from(host.clone())
                        .map_err(|_| format!("{host} is not a valid TLS server name"))?;
                    Some(
                        ClientConnection::new(Arc::new(config), name)
                            .map_err(|e| format!("setting up TLS: {e}"))?,
                    )
                } else {
                    None
                };
                let sock = tcp_connect(host, *port, limits.connect_timeout)?;
                sock.set_nodelay(true)
                    .map_err(|e| format!("setting up the redis connection: {e}"))?;
                match tls_setup {
                    Some(tls) => {
                        let mut stream = TlsStream { tls, sock };
                        stream.handshake(Timing {
                            deadline: deadline_after(limits.reply_timeout),
                            io_timeout: limits.io_timeout,
                            overall: limits.reply_timeout,
                        })?;
                        Stream::Tls(Box::new(stream))
                    }
                    None => Stream::Tcp(sock),
                }
            }
            Address::Unix(path) => {
                if url.tls {
                    return Err("TLS over a unix socket is not supported".into());
                }
                let sock = UnixStream::connect(path).map_err(|e| {
                    format!("could not connect to redis at {}: {e}", path.display())
                })?;
                Stream::Unix(sock)
            }
        };
        let mut conn = Conn {
            stream,
            limits,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            poisoned: false,
        };
        let secret = url.password.as_deref();
        if let Some(password) = secret {
            let mut auth = Command::new("AUTH");
            if let Some(user) = &url.username {
                auth.arg(user);
            }
            auth.arg(password);
            conn.expect_ok(&auth, "AUTH", secret)?;
        }
        if url.db != 0 {
            conn.expect_ok(Command::new("SELECT").arg_int(url.db), "SELECT", secret)?;
        }
        Ok(conn)
    }

    fn expect_ok(&mut self, cmd: &Command, what: &str, secret: Option<&str>) -> Result<(), String> {
        match self.call_command(cmd)? {
            Value::Simple(s) if s == "OK" => Ok(()),
            Value::Error(e) if e.chars().count() >= MAX_TEXT_CHARS => Err(format!(
                "redis refused {what} (its error message is too long to show)"
            )),
            Value::Error(e) => {
                let e = match secret {
                    Some(p) if !p.is_empty() => e.replace(p, "***"),
                    _ => e,
                };
                Err(format!("redis refused {what}: {}", cut(&e, 300)))
            }
            other => Err(format!("unexpected {} reply to {what}", other.kind())),
        }
    }

    /// Writes one command (a RESP array of bulk strings) in full; each write within
    /// `io_timeout`, the whole within `reply_timeout` (or `io_timeout` if longer).
    pub fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        let data = encode(args.iter().copied());
        self.write(&data, args.is_empty())
    }

    /// [`Conn::send`] for a [`Command`].
    pub fn send_command(&mut self, cmd: &Command) -> Result<(), String> {
        let data = encode(cmd.0.iter().map(Vec::as_slice));
        self.write(&data, cmd.0.is_empty())
    }

    /// Reads exactly one reply, within [`Limits`]. A server error reply is
    /// `Ok(Value::Error(..))`: the caller decides.
    pub fn receive(&mut self) -> Result<Value, String> {
        self.usable()?;
        let result = self.read_reply();
        self.poisoned = result.is_err();
        result
    }

    /// [`Conn::send`] then [`Conn::receive`].
    pub fn call(&mut self, args: &[&[u8]]) -> Result<Value, String> {
        self.send(args)?;
        self.receive()
    }

    /// [`Conn::send_command`] then [`Conn::receive`].
    pub fn call_command(&mut self, cmd: &Command) -> Result<Value, String> {
        self.send_command(cmd)?;
        self.receive()
    }

    fn usable(&self) -> Result<(), String> {
        if self.poisoned {
            return Err("this redis connection failed earlier and cannot be used again".into());
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8], empty: bool) -> Result<(), String> {
        self.usable()?;
        let result = if empty {
            Err("cannot send an empty redis command".into())
        } else {
            let overall = self.limits.reply_timeout.max(self.limits.io_timeout);
            let timing = Timing {
                deadline: deadline_after(overall),
                io_timeout: self.limits.io_timeout,
                overall,
            };
            self.stream.write_all(data, timing)
        };
        self.poisoned = result.is_err();
        result
    }

    fn read_reply(&mut self) -> Result<Value, String> {
        let mut budget = Budget {
            timing: Timing {
                deadline: deadline_after(self.limits.reply_timeout),
                io_timeout: self.limits.io_timeout,
                overall: self.limits.reply_timeout,
            },
            bytes: self.limits.max_reply_bytes,
            elements: self.limits.max_elements,
        };
        // Arrays being filled: their elements so far and how many they announced.
        let mut open: Vec<(Vec<Value>, usize)> = Vec::new();
        loop {
            let mut value = match self.header(&mut budget)? {
                Header::Value(v) => v,
                Header::Bulk(len) => Value::Bulk(self.bulk(len, &mut budget)?),
                Header::Array(n) => {
                    if open.len() >= self.limits.max_depth {
                        return Err(format!(
                            "redis reply nests arrays deeper than {} (max_depth)",
                            self.limits.max_depth
                        ));
                    }
                    if n > 0 {
                        open.push((Vec::new(), n));
                        continue;
                    }
                    Value::Array(Vec::new())
                }
            };
            // Hand the value to the innermost open array, closing those it completes.
            loop {
                let Some((items, wanted)) = open.last_mut() else {
                    return Ok(value);
                };
                reserve(items, 1, *wanted, 16)?;
                items.push(value);
                if items.len() < *wanted {
                    break;
                }
                let Some((items, _)) = open.pop() else {
                    return Err("internal error: no open array".into());
                };
                value = Value::Array(items);
            }
        }
    }

    /// Reads the line that starts a value.
    fn header(&mut self, budget: &mut Budget) -> Result<Header, String> {
        let limit = self.limits.max_reply_bytes;
        budget.charge(VALUE_SIZE, limit)?;
        let line = self.line(budget)?;
        let line = self.buf.get(line).unwrap_or_default();
        let Some((&kind, rest)) = line.split_first() else {
            return Err("invalid redis reply: an empty line".into());
        };
        let length = |what: &str| match parse_int(rest) {
            Some(-1) => Ok(None),
            Some(n) => usize::try_from(n)
                .map(Some)
                .map_err(|_| format!("invalid redis reply: {what} length {n}")),
            None => Err(format!(
                "invalid redis reply: {what} length is not a number"
            )),
        };
        Ok(match kind {
            b'+' => Header::Value(Value::Simple(text(rest))),
            b'-' => Header::Value(Value::Error(text(rest))),
            b':' => Header::Value(Value::Int(
                parse_int(rest).ok_or("invalid redis reply: an integer that is not a number")?,
            )),
            b'_' if rest.is_empty() => Header::Value(Value::Nil),
            b'_' => return Err("invalid redis reply: text after a RESP3 null".into()),
            b'$' => match length("bulk string")? {
                None => Header::Value(Value::Nil),
                Some(len) => Header::Bulk(len),
            },
            b'*' => match length("array")? {
                None => Header::Value(Value::Nil),
                Some(n) => {
                    if n > budget.elements {
                        return Err(format!(
                            "redis reply announces an array of {n} elements, more than the \
                             {} allowed (max_elements)",
                            self.limits.max_elements
                        ));
                    }
                    if n.saturating_mul(MIN_ELEMENT_BYTES + VALUE_SIZE) > budget.bytes {
                        return Err(format!(
                            "redis reply announces an array of {n} elements, more than fit in \
                             {limit} bytes (max_reply_bytes)"
                        ));
                    }
                    budget.elements -= n;
                    Header::Array(n)
                }
            },
            b',' | b'#' | b'(' | b'!' | b'=' | b'%' | b'~' | b'>' | b'|' => {
                return Err(format!(
                    "redis replied with the RESP3 type '{}', which this client does not speak \
                     (it never sends HELLO 3)",
                    char::from(kind)
                ))
            }
            other => {
                return Err(format!(
                    "invalid redis reply: unknown type byte 0x{other:02x}"
                ))
            }
        })
    }

    /// Reads up to the next CRLF and returns where the line (without CRLF) is in `buf`; valid
    /// until the next read.
    fn line(&mut self, budget: &mut Budget) -> Result<std::ops::Range<usize>, String> {
        let mut scanned: usize = 0;
        loop {
            let available = self.buf.get(self.start..self.end).unwrap_or_default();
            let from = scanned.saturating_sub(1);
            let found = available
                .get(from..)
                .unwrap_or_default()
                .windows(2)
                .position(|w| w == b"\r\n")
                .map(|i| i + from);
            if let Some(len) = found {
                let content = available.get(..len).unwrap_or_default();
                if len > MAX_LINE {
                    return Err(format!(
                        "invalid redis reply: a line longer than {MAX_LINE} bytes"
                    ));
                }
                if content.iter().any(|&b| b == b'\r' || b == b'\n') {
                    return Err("invalid redis reply: a line holds a bare CR or LF".into());
                }
                budget.charge(len + 2, self.limits.max_reply_bytes)?;
                let range = self.start..self.start + len;
                self.start += len + 2;
                return Ok(range);
            }
            scanned = available.len();
            if scanned > MAX_LINE + 1 {
                return Err(format!(
                    "invalid redis reply: a line longer than {MAX_LINE} bytes (no CRLF)"
                ));
            }
            if scanned >= budget.bytes {
                return Err(format!(
                    "redis reply larger than {} bytes (max_reply_bytes)",
                    self.limits.max_reply_bytes
                ));
            }
            // `fill` may move the unparsed bytes to the front; `scanned` counts from `start`.
            self.fill(budget.timing)?;
        }
    }

    /// Reads a bulk string of `len` bytes and its CRLF; `len` is charged before anything is
    /// allocated, and the result grows only as bytes arrive.
    fn bulk(&mut self, len: usize, budget: &mut Budget) -> Result<Vec<u8>, String> {
        let limit = self.limits.max_reply_bytes;
        let need = len.saturating_add(2);
        if need > budget.bytes {
            return Err(format!(
                "redis reply announces a bulk string of {len} bytes, more than is left of its \
                 {limit} bytes (max_reply_bytes)"
            ));
        }
        budget.charge(need, limit)?;
        let mut out = Vec::new();
        while out.len() < len {
            if self.start == self.end {
                self.fill(budget.timing)?;
            }
            let available = self.buf.get(self.start..self.end).unwrap_or_default();
            let take = available.len().min(len - out.len());
            reserve(&mut out, take, len, 64 * 1024)?;
            out.extend_from_slice(available.get(..take).unwrap_or_default());
            self.start += take;
        }
        while self.end - self.start < 2 {
            self.fill(budget.timing)?;
        }
        if self.buf.get(self.start..self.start + 2) != Some(b"\r\n".as_slice()) {
            return Err("invalid redis reply: a bulk string not followed by CRLF".into());
        }
        self.start += 2;
        Ok(out)
    }

    /// Reads more bytes into `buf`, first moving unparsed bytes to its front if it is full.
    fn fill(&mut self, timing: Timing) -> Result<(), String> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = self.buf.get_mut(self.end..).unwrap_or_default();
        if room.is_empty() {
            return Err("invalid redis reply: the read buffer is full".into());
        }
        let n = self.stream.read_some(room, timing)?;
        self.end += n;
        Ok(())
    }
}

/// Makes room in `v` for `additional` more items without letting its capacity pass `total`
/// (the length the server announced and we have charged): grows by doubling, at least
/// `min_step`.
fn reserve<T>(
    v: &mut Vec<T>,
    additional: usize,
    total: usize,
    min_step: usize,
) -> Result<(), String> {
    if v.capacity() - v.len() >= additional {
        return Ok(());
    }
    let step = v
        .capacity()
        .max(min_step)
        .min(total.saturating_sub(v.len()))
        .max(additional);
    v.try_reserve_exact(step)
        .map_err(|_| "out of memory while reading a redis reply".to_string())
}

/// Text of a simple string or error: lossy UTF-8, at most `MAX_TEXT_CHARS` characters.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(MAX_TEXT_CHARS)
        .collect()
}

/// A RESP integer: an optional `-` and 1 to 19 ASCII digits, within i64.
fn parse_int(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        n = n.checked_mul(10)?;
        n = if negative {
            n.checked_sub(d)?
        } else {
            n.checked_add(d)?
        };
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;
    use std::thread;

    /// A fake server on 127.0.0.1: runs `script` on the first connection.
    fn serve(script: impl FnOnce(TcpStream) + Send + 'static) -> Url {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            if let Ok((sock, _)) = listener.accept() {
                sock.set_write_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                script(sock);
            }
        });
        Url {
            address: Address::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            tls: false,
            username: None,
            password: None,
            db: 0,
        }
    }

    /// A fake server that writes `reply` and then waits for the client to go away.
    fn replying(reply: &'static [u8]) -> Url {
        serve(move |mut sock| {
            let _ = sock.write_all(reply);
            let _ = sock.read(&mut [0; 16]);
        })
    }

    fn quick() -> Limits {
        Limits {
            io_timeout: Duration::from_secs(1),
            reply_timeout: Duration::from_secs(1),
            ..Limits::default()
        }
    }

    fn connect(url: &Url, limits: Limits) -> Conn {
        Conn::connect(url, &Tls::default(), limits).unwrap()
    }

    /// Reads exactly `n` bytes the client sent.
    fn received(sock: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        sock.read_exact(&mut got).unwrap();
        got
    }

    fn first_reply(reply: &'static [u8], limits: Limits) -> Result<Value, String> {
        connect(&replying(reply), limits).receive()
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(s.as_bytes().to_vec())
    }

    #[test]
    fn reads_every_reply_type() {
        let url = replying(
            b"+OK\r\n:-42\r\n:9223372036854775807\r\n$5\r\nhe\r\no\r\n$0\r\n\r\n$-1\r\n*-1\r\n_\r\n\
              *0\r\n-WRONGTYPE Operation against a key\r\n\
              *3\r\n:1\r\n*2\r\n+a\r\n$-1\r\n*1\r\n*0\r\n",
        );
        let mut conn = connect(&url, quick());
        let expected = [
            Value::Simple("OK".into()),
            Value::Int(-42),
            Value::Int(i64::MAX),
            bulk("he\r\no"),
            bulk(""),
            Value::Nil,
            Value::Nil,
            Value::Nil,
            Value::Array(vec![]),
            Value::Error("WRONGTYPE Operation against a key".into()),
            Value::Array(vec![
                Value::Int(1),
                Value::Array(vec![Value::Simple("a".into()), Value::Nil]),
                Value::Array(vec![Value::Array(vec![])]),
            ]),
        ];
        for want in expected {
            assert_eq!(conn.receive().unwrap(), want);
        }
    }

    #[test]
    fn sends_commands_and_pipelines() {
        let (tx, rx) = mpsc::channel();
        let want: &[u8] = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n42\r\n*1\r\n$4\r\nPING\r\n";
        let url = serve(move |mut sock| {
            tx.send(received(&mut sock, want.len())).unwrap();
            sock.write_all(b"+OK\r\n+PONG\r\n").unwrap();
            let _ = sock.read(&mut [0; 16]);
        });
        let mut conn = connect(&url, quick());
        conn.send_command(Command::new("SET").arg("k").arg_int(42))
            .unwrap();
        conn.send(&[b"PING"]).unwrap();
        assert_eq!(conn.receive().unwrap(), Value::Simple("OK".into()));
        assert_eq!(conn.receive().unwrap(), Value::Simple("PONG".into()));
        assert_eq!(rx.recv().unwrap(), want);
    }

    #[test]
    fn a_huge_announced_bulk_is_refused_before_reading_it() {
        let url = serve(|mut sock| {
            let _ = sock.write_all(b"$9999999999\r\n");
            let chunk = [b'x'; 64 * 1024];
            while sock.write_all(&chunk).is_ok() {}
        });
        let mut conn = connect(&url, Limits::default());
        let started = Instant::now();
        let err = conn.receive().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{err}");
        assert!(err.contains("9999999999"), "{err}");
        // Poisoned from now on.
        assert!(conn.call(&[b"PING"]).is_err());
    }

    #[test]
    fn a_bulk_within_the_budget_that_never_ends_times_out() {
        let url = serve(|mut sock| {
            let _ = sock.write_all(b"$100000000\r\n");
            let chunk = [b'x'; 1024];
            while sock.write_all(&chunk).is_ok() {
                thread::sleep(Duration::from_millis(10));
            }
        });
        let limits = Limits {
            max_reply_bytes: 200_000_000,
            ..quick()
        };
        let started = Instant::now();
        let err = connect(&url, limits).receive().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{err}");
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn a_huge_announced_array_is_refused_without_allocating() {
        let err = first_reply(b"*2000000000\r\n", quick()).unwrap_err();
        assert!(err.contains("max_elements"), "{err}");
        let unlimited = Limits {
            max_elements: usize::MAX,
            ..quick()
        };
        let err = first_reply(b"*2000000000\r\n", unlimited).unwrap_err();
        assert!(err.contains("max_reply_bytes"), "{err}");
        let few = Limits {
            max_elements: 3,
            ..quick()
        };
        let err = first_reply(b"*2\r\n*2\r\n:1\r\n:2\r\n:3\r\n", few).unwrap_err();
        assert!(err.contains("max_elements"), "{err}");
    }

    #[test]
    fn the_byte_budget_covers_the_whole_reply() {
        let small = Limits {
            max_reply_bytes: 400,
            ..quick()
        };
        // One 100-byte bulk fits; four of them do not.
        let items = |n: usize| {
            let mut reply = format!("*{n}\r\n").into_bytes();
            for _ in 0..n {
                reply.extend_from_slice(b"$100\r\n");
                reply.extend(std::iter::repeat_n(b'x', 100));
                reply.extend_from_slice(b"\r\n");
            }
            serve(move |mut sock| {
                let _ = sock.write_all(&reply);
                let _ = sock.read(&mut [0; 16]);
            })
        };
        let one = connect(&items(1), small).receive().unwrap();
        assert_eq!(one, Value::Array(vec![Value::Bulk(vec![b'x'; 100])]));
        let err = connect(&items(4), small).receive().unwrap_err();
        assert!(err.contains("max_reply_bytes"), "{err}");
    }

    #[test]
    fn a_dribbled_reply_times_out_as_a_whole() {
        let url = serve(|mut sock| {
            let _ = sock.write_all(b"+");
            for _ in 0..20 {
                thread::sleep(Duration::from_millis(300));
                if sock.write_all(b"a").is_err() {
                    break;
                }
            }
        });
        let mut conn = connect(&url, quick());
        let started = Instant::now();
        let err = conn.receive().unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?} {err}");
        assert!(took >= Duration::from_millis(900), "{took:?} {err}");
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn a_silent_server_times_out_after_io_timeout() {
        let url = serve(|mut sock| {
            let _ = sock.read(&mut [0; 16]);
        });
        let limits = Limits {
            io_timeout: Duration::from_millis(200),
            reply_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let started = Instant::now();
        let err = connect(&url, limits).receive().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "{err}");
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn a_server_closing_mid_reply_is_an_error() {
        for reply in [
            &b"$10\r\nabc"[..],
            b"*3\r\n:1\r\n",
            b"+OK",
            b"$3\r\nabc\r",
            b"",
        ] {
            let url = serve(move |mut sock| {
                let _ = sock.write_all(reply);
            });
            let err = connect(&url, quick()).receive().unwrap_err();
            assert!(err.contains("closed"), "{err}");
        }
    }

    #[test]
    fn protocol_violations_are_errors() {
        for reply in [
            &b"?foo\r\n"[..],
            b"\r\n",
            b"$abc\r\n",
            b"$-2\r\n",
            b"$\r\n",
            b"*-5\r\n",
            b"$3\r\nabcXY",
            b":12x\r\n",
            b":99999999999999999999\r\n",
            b":\r\n",
            b"+a\nb\r\n",
            b"_x\r\n",
            b"%1\r\n+a\r\n+b\r\n",
            b",1.5\r\n",
            b"$1\r\n\xff\r\n*1\r\n\xfe\r\n",
        ] {
            let result = first_reply(reply, quick());
            let result = match result {
                // The valid first reply of the last case; its second one is bad.
                Ok(Value::Bulk(_)) => {
                    let mut conn = connect(&replying(reply), quick());
                    conn.receive().unwrap();
                    conn.receive()
                }
                other => other,
            };
            assert!(
                result.is_err(),
                "{:?} gave {result:?}",
                String::from_utf8_lossy(reply)
            );
        }
        let err = first_reply(b"%1\r\n", quick()).unwrap_err();
        assert!(err.contains("RESP3"), "{err}");
    }

    #[test]
    fn an_overlong_line_is_an_error() {
        let url = serve(|mut sock| {
            let _ = sock.write_all(b"+");
            let chunk = [b'a'; 16 * 1024];
            while sock.write_all(&chunk).is_ok() {}
        });
        let started = Instant::now();
        let err = connect(&url, quick()).receive().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2), "{err}");
        assert!(err.contains("longer than"), "{err}");
        // A line of exactly the maximum is fine.
        let url = serve(|mut sock| {
            let mut line = vec![b'+'];
            line.extend(std::iter::repeat_n(b'a', MAX_LINE - 1));
            line.extend_from_slice(b"\r\n");
            let _ = sock.write_all(&line);
            let _ = sock.read(&mut [0; 16]);
        });
        let value = connect(&url, quick()).receive().unwrap();
        assert_eq!(value, Value::Simple("a".repeat(MAX_TEXT_CHARS)));
    }

    #[test]
    fn nesting_is_bounded() {
        let limits = Limits {
            max_depth: 3,
            ..quick()
        };
        let three = first_reply(b"*1\r\n*1\r\n*1\r\n:7\r\n", limits).unwrap();
        let want = Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::Int(7)])])]);
        assert_eq!(three, want);
        let err = first_reply(b"*1\r\n*1\r\n*1\r\n*1\r\n:7\r\n", limits).unwrap_err();
        assert!(err.contains("max_depth"), "{err}");
        let err = first_reply(b"*1\r\n*1\r\n*1\r\n*0\r\n", limits).unwrap_err();
        assert!(err.contains("max_depth"), "{err}");
        // The default allows 8.
        let deep: &[u8] = b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n";
        let err = first_reply(deep, quick()).unwrap_err();
        assert!(err.contains("max_depth"), "{err}");
        assert!(first_reply(&deep[4..], quick()).is_ok());
    }

    #[test]
    fn auth_and_select_are_sent_on_connect() {
        let (tx, rx) = mpsc::channel();
        let auth: &[u8] = b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$6\r\np@ss:w\r\n";
        let select: &[u8] = b"*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n";
        let mut url = serve(move |mut sock| {
            tx.send(received(&mut sock, auth.len())).unwrap();
            sock.write_all(b"+OK\r\n").unwrap();
            tx.send(received(&mut sock, select.len())).unwrap();
            sock.write_all(b"+OK\r\n").unwrap();
            let _ = sock.read(&mut [0; 16]);
        });
        let parsed = parse_url("redis://app:p%40ss%3Aw@127.0.0.1/3").unwrap();
        url.username = parsed.username;
        url.password = parsed.password;
        url.db = parsed.db;
        connect(&url, quick());
        assert_eq!(rx.recv().unwrap(), auth);
        assert_eq!(rx.recv().unwrap(), select);

        // Password only.
        let (tx, rx) = mpsc::channel();
        let auth: &[u8] = b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n";
        let mut url = serve(move |mut sock| {
            tx.send(received(&mut sock, auth.len())).unwrap();
            sock.write_all(b"+OK\r\n").unwrap();
            let _ = sock.read(&mut [0; 16]);
        });
        url.password = Some("s3cret".into());
        connect(&url, quick());
        assert_eq!(rx.recv().unwrap(), auth);
    }

    #[test]
    fn refused_auth_never_shows_the_password() {
        let mut url = serve(|mut sock| {
            let _ = sock.read(&mut [0; 256]);
            let _ = sock.write_all(b"-WRONGPASS s3cret is not the password\r\n");
            let _ = sock.read(&mut [0; 16]);
        });
        url.password = Some("s3cret".into());
        let err = Conn::connect(&url, &Tls::default(), quick()).err().unwrap();
        assert!(err.contains("WRONGPASS"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");

        let mut url = serve(|mut sock| {
            let _ = sock.read(&mut [0; 256]);
            let _ = sock.write_all(b"$6\r\ns3cret\r\n");
            let _ = sock.read(&mut [0; 16]);
        });
        url.password = Some("s3cret".into());
        let err = Conn::connect(&url, &Tls::default(), quick()).err().unwrap();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn connect_failures_are_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = parse_url(&format!("redis://127.0.0.1:{port}")).unwrap();
        assert!(Conn::connect(&url, &Tls::default(), quick()).is_err());
        let url = parse_url("unix:///nonexistent/redis.sock").unwrap();
        assert!(Conn::connect(&url, &Tls::default(), quick()).is_err());
    }

    #[test]
    fn talks_over_a_unix_socket() {
        let path = std::env::temp_dir().join(format!("resp-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            if let Ok((mut sock, _)) = listener.accept() {
                let mut got = [0; 14];
                sock.read_exact(&mut got).unwrap();
                assert_eq!(&got, b"*1\r\n$4\r\nPING\r\n");
                sock.write_all(b"+PONG\r\n").unwrap();
                let _ = sock.read(&mut [0; 16]);
            }
        });
        let url = Url {
            address: Address::Unix(path.clone()),
            tls: false,
            username: None,
            password: None,
            db: 0,
        };
        let mut conn = connect(&url, quick());
        assert_eq!(conn.call(&[b"PING"]).unwrap(), Value::Simple("PONG".into()));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn describe_is_short() {
        let long = "x".repeat(5000);
        for value in [
            Value::Nil,
            Value::Int(-3),
            Value::Simple(long.clone()),
            Value::Error(long.clone()),
            Value::Bulk(long.clone().into_bytes()),
            Value::Bulk(vec![0xff; 3000]),
            Value::Array(vec![Value::Nil; 3]),
        ] {
            let text = value.describe();
            assert!(text.chars().count() <= 200, "{text}");
        }
        assert_eq!(Value::Int(5).describe(), "integer 5");
        assert_eq!(Value::Error("ERR x".into()).describe(), "error \"ERR x\"");
    }

    #[test]
    fn parses_urls() {
        let tcp = |host: &str, port| Address::Tcp {
            host: host.into(),
            port,
        };
        let url = parse_url("redis://127.0.0.1").unwrap();
        assert_eq!(url.address, tcp("127.0.0.1", 6379));
        assert_eq!((url.tls, url.db), (false, 0));
        assert_eq!((url.username, url.password), (None, None));

        let url = parse_url("rediss://user:p%40ss%3Aw%2F@redis.example.com:6380/2").unwrap();
        assert_eq!(url.address, tcp("redis.example.com", 6380));
        assert!(url.tls);
        assert_eq!(url.username.as_deref(), Some("user"));
        assert_eq!(url.password.as_deref(), Some("p@ss:w/"));
        assert_eq!(url.db, 2);

        let url = parse_url("redis://:s3cret@h:1/").unwrap();
        assert_eq!(
            (url.username, url.password.as_deref()),
            (None, Some("s3cret"))
        );
        let url = parse_url("redis://app:p@ss@h").unwrap();
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        let url = parse_url("redis://app@h").unwrap();
        assert_eq!((url.username.as_deref(), url.password), (Some("app"), None));
        let url = parse_url("redis://u:100%sure@h").unwrap();
        assert_eq!(url.password.as_deref(), Some("100%sure"));

        assert_eq!(
            parse_url("redis://[::1]:6380/1").unwrap().address,
            tcp("::1", 6380)
        );
        assert_eq!(
            parse_url("redis://[::1]").unwrap().address,
            tcp("::1", 6379)
        );
        assert_eq!(parse_url("redis://h:").unwrap().address, tcp("h", 6379));
        assert_eq!(
            parse_url(" REDIS://h:7000 ").unwrap().address,
            tcp("h", 7000)
        );
        assert!(parse_url("valkeys://h").unwrap().tls);
        assert_eq!(parse_url("redis://h/?protocol=resp2").unwrap().db, 0);

        let url = parse_url("redis+unix:///var/run/redis.sock?db=2&user=u&pass=s3cret").unwrap();
        assert_eq!(url.address, Address::Unix("/var/run/redis.sock".into()));
        assert_eq!(url.db, 2);
        assert_eq!(url.username.as_deref(), Some("u"));
        assert_eq!(url.password.as_deref(), Some("s3cret"));
        let url = parse_url("unix:///tmp/my%20redis.sock?password=a%2Bb+c").unwrap();
        assert_eq!(url.address, Address::Unix("/tmp/my redis.sock".into()));
        assert_eq!(url.password.as_deref(), Some("a+b c"));
        assert!(!url.tls);
        assert_eq!(
            parse_url("unix:/tmp/r.sock").unwrap().address,
            Address::Unix("/tmp/r.sock".into())
        );
        let url = parse_url("unix://localhost/tmp/r.sock").unwrap();
        assert_eq!(url.address, Address::Unix("/tmp/r.sock".into()));
        assert!(!format!("{url:?}").contains("s3cret"));
        let url = parse_url("redis://:s3cret@h").unwrap();
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn refuses_bad_urls_without_showing_the_password() {
        for bad in [
            "redis://:s3cret@h:0",
            "redis://:s3cret@h:65536",
            "redis://:s3cret@h:99999",
            "redis://:s3cret@h:abc",
            "redis://:s3cret@h:+80",
            "redis://:s3cret@h:1:2",
            "redis://:s3cret@h/x",
            "redis://:s3cret@h/-1",
            "redis://:s3cret@h/99999999999999999999",
            "redis://:s3cret@",
            "redis://:s3cret@:6379",
            "redis://",
            "redis:h",
            "rediss+unix:///tmp/s3cret.sock",
            "rediss+unix:///tmp/r.sock?pass=s3cret",
            "http://:s3cret@h",
            "s3cret",
            "",
            "redis://h?pass=s3cret",
            "redis://h?s3cret",
            "redis://:s3cret@h#insecure",
            "redis://:s3c#ret@h",
            "redis://:s3c/ret@h",
            "redis://u:s3c/ret@h",
            "redis://u:s3c?ret@h",
            "redis://:s3cret@h h",
            "redis://:s3cret@0.0.0.0",
            "redis://:s3cret@[::]",
            "redis://:s3cret@[::1",
            "redis://:s3cret@[::1]x",
            "redis://:s3cret@[nonsense]",
            "redis://:s3cret@exa*mple",
            "redis://:s3cret@h?protocol=resp3",
            "redis://:%FFs3cret@h",
            "unix://",
            "unix:///",
            "unix://host/tmp/r.sock?pass=s3cret",
            "unix://u:s3cret@/tmp/r.sock",
            "unix:///tmp/r.sock?db=x&pass=s3cret",
            "unix:///tmp/r.sock?db=-1&pass=s3cret",
            "unix:///tmp/r.sock?pass=s3cret&password=s3cret2",
            "unix:///tmp/r.sock?pass=s3cret&s3cret=1",
            "unix:///tmp/r%00.sock?pass=s3cret",
            "unix:///tmp/r.sock?pass=%FFs3cret",
        ] {
            let err = parse_url(bad)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad}"));
            assert!(!err.contains("s3c"), "{bad}: {err}");
            let redacted = redact_url(bad);
            assert_eq!(redacted, "<unparsable redis url>", "{bad}");
        }
        let err = parse_url("rediss+unix:///tmp/r.sock").unwrap_err();
        assert!(err.contains("unix"), "{err}");
    }

    #[test]
    fn redacts_every_form() {
        for (url, want) in [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:s3cret@h:1/2", "redis://***@h:1/2"),
            ("redis://app:s3cret@h:1/2", "redis://app:***@h:1/2"),
            ("redis://app:p@ss@s3cret@h:1", "redis://app:***@h:1"),
            ("redis://app@h", "redis://app@h"),
            (
                "rediss://u:s3%40cret@[::1]:6380/1",
                "rediss://u:***@[::1]:6380/1",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=s3cret&user=u",
                "redis+unix:///tmp/r.sock?db=1&pass=***&user=u",
            ),
            (
                "unix:///tmp/r.sock?password=s3cret",
                "unix:///tmp/r.sock?password=***",
            ),
            (
                "unix:///tmp/r.sock?p%61ss=s3cret",
                "unix:///tmp/r.sock?p%61ss=***",
            ),
            (
                "unix:/tmp/r.sock?user=u&pass=s3cret",
                "unix:/tmp/r.sock?user=u&pass=***",
            ),
            ("garbage:s3cret", "<unparsable redis url>"),
            ("redis://:s3cret@h:99999", "<unparsable redis url>"),
        ] {
            let redacted = redact_url(url);
            assert_eq!(redacted, want, "{url}");
            assert!(!redacted.contains("s3"), "{url}");
        }
    }

    #[test]
    fn commands_encode_as_arrays_of_bulk_strings() {
        let mut cmd = Command::new("EVALSHA");
        cmd.arg("abc")
            .arg_int(-2)
            .arg(b"\r\n".as_slice())
            .arg(String::new());
        let parts: Vec<&[u8]> = cmd.0.iter().map(Vec::as_slice).collect();
        assert_eq!(
            encode(parts.into_iter()),
            b"*5\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$2\r\n-2\r\n$2\r\n\r\n\r\n$0\r\n\r\n"
        );
        let url = replying(b"");
        let mut conn = connect(&url, quick());
        assert!(conn.send(&[]).is_err());
    }

    #[test]
    fn parses_integers_strictly() {
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int(b"9223372036854775808"), None);
        for bad in [&b""[..], b"-", b"+1", b" 1", b"1 ", b"0x1", b"1.0"] {
            assert_eq!(parse_int(bad), None);
        }
    }

    // TLS: a test CA and a certificate for localhost and 127.0.0.1 it signed (EC P-256, valid
    // 2000-2100), made for these tests only.
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBZzCCAQ2gAwIBAgIBAjAKBggqhkjOPQQDAjAaMRgwFgYDVQQDDA9wZ19rZWVs
IHRlc3QgQ0EwIBcNMDAwMTAxMDAwMDAwWhgPMjEwMDAxMDEwMDAwMDBaMBoxGDAW
BgNVBAMMD3BnX2tlZWwgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IA
BLg6i60yN9BMHz3hVpyjyBewn0etLBQjMeUAZ5CrOB+qcv1eGAKR3lOWuEVHcjGa
9aITX/qflbaaPwVOLiDevZKjQjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/
BAQDAgEGMB0GA1UdDgQWBBQQwLjGRlnmnVDodFm2ARFjUk535jAKBggqhkjOPQQD
AgNIADBFAiB28MJMDk42SYPBkfh5i6RT9pCrt7qLluh+l/M+sI307wIhAKy/zL1S
r9feYsBnwYIfHWGNHPjdea+P4wFEcVlJtN3e
-----END CERTIFICATE-----
";
    const LEAF: &str = "-----BEGIN CERTIFICATE-----
MIIBvDCCAWKgAwIBAgIBAzAKBggqhkjOPQQDAjAaMRgwFgYDVQQDDA9wZ19rZWVs
IHRlc3QgQ0EwIBcNMDAwMTAxMDAwMDAwWhgPMjEwMDAxMDEwMDAwMDBaMBQxEjAQ
BgNVBAMMCWxvY2FsaG9zdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABDhtF8ON
ALiuO77Mr/3Tfw/fL+0F0PYhMggrMOSJxi8P/UTecCDAb7y9vbOPx3mZ7d8A0Iob
FSMXcbsHNkGY6FWjgZwwgZkwDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMCB4Aw
HQYDVR0lBBYwFAYIKwYBBQUHAwEGCCsGAQUFBwMCMBoGA1UdEQQTMBGCCWxvY2Fs
aG9zdIcEfwAAATAdBgNVHQ4EFgQUv0Sro4X+xBk8vqvXNEC0Zb+1FkMwHwYDVR0j
BBgwFoAUEMC4xkZZ5p1Q6HRZtgERY1JOd+YwCgYIKoZIzj0EAwIDSAAwRQIgOwty
HcUVFxW1yx6QIoNE3X7Bi1hwtJ1hmUtgPkxxwB4CIQDfqwzBalv2FApf23R7NQBF
t3xgn6+OY4JZKAFd0AC+yg==
-----END CERTIFICATE-----
";
    const LEAF_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBDhDCUSeBWVtSQW/
AQll86MpXovqBngR2V8x16fgA6ehRANCAAQ4bRfDjQC4rju+zK/9038P3y/tBdD2
ITIIKzDkicYvD/1E3nAgwG+8vb2zj8d5me3fANCKGxUjF3G7BzZBmOhV
-----END PRIVATE KEY-----
";

    fn pem_file(test: &str, name: &str, content: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "resp-test-{}-{test}-{name}.pem",
            std::process::id()
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    /// A TLS fake server that answers PING with PONG; `client_ca`: require a client
    /// certificate it signed.
    fn serve_tls(host: &str, client_ca: bool) -> Url {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = vec![CertificateDer::from_pem_slice(LEAF.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(LEAF_KEY.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if client_ca {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(CA.as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
        let mut url = serve(move |sock| {
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let mut got = [0; 14];
            if tls.read_exact(&mut got).is_ok() && &got == b"*1\r\n$4\r\nPING\r\n" {
                let _ = tls.write_all(b"+PONG\r\n");
                let _ = tls.flush();
                let _ = tls.read(&mut [0; 16]);
            }
        });
        url.tls = true;
        if let Address::Tcp { host: h, .. } = &mut url.address {
            *h = host.into();
        }
        url
    }

    fn ping(url: &Url, tls: &Tls) -> Result<Value, String> {
        Conn::connect(url, tls, quick())?.call(&[b"PING"])
    }

    #[test]
    fn tls_verifies_against_a_ca_file() {
        let ca = pem_file("verify", "ca", CA);
        let tls = Tls {
            ca_file: Some(ca.clone()),
            ..Tls::default()
        };
        let pong = Value::Simple("PONG".into());
        assert_eq!(ping(&serve_tls("localhost", false), &tls).unwrap(), pong);
        assert_eq!(ping(&serve_tls("127.0.0.1", false), &tls).unwrap(), pong);
        // A certificate signed by another CA (here: the system roots) is refused.
        let err = ping(&serve_tls("localhost", false), &Tls::default()).unwrap_err();
        assert!(err.contains("TLS") || err.contains("CA"), "{err}");
        // A CA file without certificates, or missing, is an error.
        let empty = pem_file("verify", "empty", "nothing here\n");
        for ca_file in [empty.clone(), PathBuf::from("/nonexistent/ca.pem")] {
            let tls = Tls {
                ca_file: Some(ca_file),
                ..Tls::default()
            };
            assert!(ping(&serve_tls("localhost", false), &tls).is_err());
        }
        let _ = std::fs::remove_file(ca);
        let _ = std::fs::remove_file(empty);
    }

    #[test]
    fn tls_without_verification_accepts_any_certificate() {
        let tls = Tls {
            verify: false,
            ..Tls::default()
        };
        let value = ping(&serve_tls("localhost", false), &tls).unwrap();
        assert_eq!(value, Value::Simple("PONG".into()));
    }

    #[test]
    fn tls_sends_a_client_certificate() {
        let ca = pem_file("mtls", "ca", CA);
        let cert = pem_file("mtls", "cert", LEAF);
        let key = pem_file("mtls", "key", LEAF_KEY);
        let tls = Tls {
            ca_file: Some(ca.clone()),
            verify: true,
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        };
        let value = ping(&serve_tls("localhost", true), &tls).unwrap();
        assert_eq!(value, Value::Simple("PONG".into()));
        // Without one the server refuses.
        let without = Tls {
            cert_file: None,
            key_file: None,
            ..tls.clone()
        };
        assert!(ping(&serve_tls("localhost", true), &without).is_err());
        // Half a client certificate is an error.
        let half = Tls {
            key_file: None,
            ..tls.clone()
        };
        let err = ping(&serve_tls("localhost", true), &half).unwrap_err();
        assert!(err.contains("both"), "{err}");
        for path in [ca, cert, key] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn tls_to_a_bad_server_fails_cleanly_and_in_time() {
        let tls = Tls {
            verify: false,
            ..Tls::default()
        };
        // Answers the ClientHello with RESP.
        let mut url = serve(|mut sock| {
            let _ = sock.read(&mut [0; 4096]);
            let _ = sock.write_all(b"-ERR wrong protocol\r\n");
            let _ = sock.read(&mut [0; 16]);
        });
        url.tls = true;
        assert!(Conn::connect(&url, &tls, quick()).is_err());
        // Says nothing, or dribbles: the handshake ends within reply_timeout.
        let mut url = serve(|mut sock| {
            let _ = sock.read(&mut [0; 4096]);
            // A handshake record announcing 16 KiB, then its body a byte at a time.
            let _ = sock.write_all(b"\x16\x03\x03\x40\x00");
            for _ in 0..20 {
                thread::sleep(Duration::from_millis(300));
                if sock.write_all(b"\x02").is_err() {
                    break;
                }
            }
        });
        url.tls = true;
        let started = Instant::now();
        let err = Conn::connect(&url, &tls, quick()).err().unwrap();
        assert!(started.elapsed() < Duration::from_millis(1500), "{err}");
        assert!(err.contains("timed out"), "{err}");
    }
}
