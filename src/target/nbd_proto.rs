//! Sans-I/O implementation of the NBD (Network Block Device) wire protocol.
//!
//! This module never touches a socket. The connection code feeds received bytes in and writes
//! the produced bytes out:
//!
//! * Handshake phase (fixed newstyle only): [`Handshake`] is a state machine. Call
//!   [`Handshake::greeting`] once and send its output, then repeatedly call
//!   [`Handshake::feed`] with everything received so far that has not been consumed yet. It
//!   returns how many bytes it consumed (the caller keeps the rest and appends new data to it)
//!   and appends the replies to send to `out`. Input may be split at any byte boundary.
//! * Transmission phase: [`parse_request`] decodes a 28-byte request header,
//!   [`validate_request`] checks it against the export, and the `encode_*` functions write
//!   simple replies and structured reply chunks into caller-provided buffers without allocating.
//!
//! The [`client`] module builds the client side of the conversation; it is used by the tests,
//! by integration tests and by the fuzz target.
//!
//! Protocol reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magics.
// ---------------------------------------------------------------------------------------------

/// Server greeting magic, ASCII `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation / option request magic, ASCII `IHAVEOPT`.
pub const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic at the start of every option reply sent by the server.
pub const NBD_OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic at the start of every transmission request.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic at the start of every simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic at the start of every structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: the server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client uses fixed newstyle negotiation (required by this server).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server must omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent per export).
// ---------------------------------------------------------------------------------------------

/// Transmission flag: always set; the other flags are meaningful.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server supports `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the server supports `NBD_CMD_FLAG_FUA`.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export has rotational characteristics.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: the server supports `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: the server supports `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`).
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the server supports `NBD_CMD_FLAG_DF` (requires structured replies).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes are consistent across multiple connections to the export.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: the server supports `NBD_CMD_RESIZE` (not implemented here).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: the server supports `NBD_CMD_CACHE` (not implemented here).
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the server supports `NBD_CMD_FLAG_FAST_ZERO` (not advertised here).
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options (client requests during the handshake).
// ---------------------------------------------------------------------------------------------

/// Option: select an export and end the handshake (cannot report errors).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: abort the negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: query export details without ending the handshake.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: query export details and end the handshake on success.
pub const NBD_OPT_GO: u32 = 7;
/// Option: negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

// ---------------------------------------------------------------------------------------------
// Option reply types.
// ---------------------------------------------------------------------------------------------

/// Option reply: success / end of a reply list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export in an `NBD_OPT_LIST` answer.
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one information item in an `NBD_OPT_INFO` / `NBD_OPT_GO` answer.
pub const NBD_REP_INFO: u32 = 3;
/// Bit set in every option error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: the option is not supported.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR + 1;
/// Option error: forbidden by server policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR + 2;
/// Option error: the option is syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR + 3;
/// Option error: not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR + 4;
/// Option error: TLS must be negotiated first.
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR + 5;
/// Option error: the requested export is unknown.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR + 6;
/// Option error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR + 7;
/// Option error: the client must request `NBD_INFO_BLOCK_SIZE`.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR + 8;
/// Option error: the request or reply would be too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR + 9;

// ---------------------------------------------------------------------------------------------
// Information types (`NBD_REP_INFO` payloads and `NBD_OPT_INFO`/`NBD_OPT_GO` requests).
// ---------------------------------------------------------------------------------------------

/// Info: export size (u64) and transmission flags (u16).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info: human-readable export description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info: block size constraints (minimum, preferred, maximum payload; u32 each).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and command flags.
// ---------------------------------------------------------------------------------------------

/// Command: read `length` bytes at `offset`.
pub const NBD_CMD_READ: u16 = 0;
/// Command: write the `length` payload bytes that follow the header at `offset`.
pub const NBD_CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Command: flush written data to stable storage.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Command: discard a range.
pub const NBD_CMD_TRIM: u16 = 4;
/// Command: prefetch a range (not supported here).
pub const NBD_CMD_CACHE: u16 = 5;
/// Command: write zeroes to a range.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Command: query block status (not supported here).
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`NBD_CMD_WRITE_ZEROES`): do not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`NBD_CMD_READ`): reply with at most one data chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`NBD_CMD_BLOCK_STATUS`): one extent only (not supported here).
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`NBD_CMD_WRITE_ZEROES`): fail fast if zeroing is slow (not advertised here).
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------------
// Error values (transmission phase). These are NBD's own numbering, not the host's errno.
// ---------------------------------------------------------------------------------------------

/// NBD error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// NBD error: input/output error.
pub const NBD_EIO: u32 = 5;
/// NBD error: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// NBD error: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// NBD error: server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Structured replies.
// ---------------------------------------------------------------------------------------------

/// Structured reply flag: this is the last chunk for the cookie.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (typically the final chunk).
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: u64 offset followed by data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: u64 offset and u32 hole size (reads as zeroes).
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// Chunk type: u32 error, u16 message length, message.
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT + 1;
/// Chunk type: u32 error, u16 message length, message, u64 offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT + 2;

// ---------------------------------------------------------------------------------------------
// Sizes and limits.
// ---------------------------------------------------------------------------------------------

/// Bytes in the server greeting: `NBDMAGIC`, `IHAVEOPT`, u16 handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes in the client flags sent after the greeting.
pub const CLIENT_FLAGS_BYTES: usize = 4;
/// Bytes in an option request header: magic, u32 option, u32 data length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes in an option reply header: magic, u32 option, u32 reply type, u32 data length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZERO_PAD_BYTES: usize = 124;
/// Largest option data length accepted; a longer option is a protocol error (no buffering).
pub const MAX_OPTION_DATA_BYTES: u32 = 64 * 1024;
/// Largest string (export name, message) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;
/// Bytes in a transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Bytes in a structured reply chunk header.
pub const STRUCTURED_CHUNK_HEADER_BYTES: usize = 20;
/// Bytes of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk before its data: header + u64 offset.
pub const OFFSET_DATA_HEADER_BYTES: usize = STRUCTURED_CHUNK_HEADER_BYTES + 8;
/// Bytes of a whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: header + u64 offset + u32 size.
pub const OFFSET_HOLE_CHUNK_BYTES: usize = STRUCTURED_CHUNK_HEADER_BYTES + 12;
/// Bytes of an `NBD_REPLY_TYPE_ERROR` chunk without its message.
pub const ERROR_CHUNK_FIXED_BYTES: usize = STRUCTURED_CHUNK_HEADER_BYTES + 6;
/// Bytes of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk without its message.
pub const ERROR_OFFSET_CHUNK_FIXED_BYTES: usize = ERROR_CHUNK_FIXED_BYTES + 8;

/// Longest piece of a client-supplied string echoed back in error messages.
const MAX_ECHO_BYTES: usize = 256;

// ---------------------------------------------------------------------------------------------
// Errors and configuration.
// ---------------------------------------------------------------------------------------------

/// Malformed or forbidden protocol input. The caller should close this connection only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// Human-readable description of what was wrong.
    pub what: String,
}

impl ProtoError {
    fn new(what: impl Into<String>) -> Self {
        Self { what: what.into() }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nbd protocol error: {}", self.what)
    }
}

impl std::error::Error for ProtoError {}

/// One export offered by the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name as clients request it. The empty name also selects the first export when no
    /// export is literally named `""` (NBD's "default export").
    pub name: String,
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Minimum block size (alignment of offsets and lengths); power of two, at most 64 KiB.
    pub block_size_min: u32,
    /// Preferred block size; power of two, at least `max(block_size_min, 512)`.
    pub block_size_preferred: u32,
    /// Maximum payload of a single request; at least `block_size_preferred`.
    pub block_size_max: u32,
    /// Whether writes, trims and write-zeroes are refused.
    pub read_only: bool,
    /// Whether `NBD_FLAG_CAN_MULTI_CONN` is advertised (flush is consistent across connections).
    pub multi_conn: bool,
    /// Human-readable description (sent with `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`).
    pub description: String,
}

impl ExportInfo {
    /// Checks the export against the protocol's rules for names and block sizes; meant to be
    /// called once when the configuration is loaded.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let fail = |what: String| Err(ProtoError::new(format!("export {:?}: {what}", self.name)));
        if self.name.len() > MAX_STRING_BYTES || self.name.contains('\0') {
            return fail("name must be at most 4096 bytes without NUL".into());
        }
        if self.description.len() > MAX_STRING_BYTES || self.description.contains('\0') {
            return fail("description must be at most 4096 bytes without NUL".into());
        }
        let (min, pref, max) = (
            self.block_size_min,
            self.block_size_preferred,
            self.block_size_max,
        );
        if !min.is_power_of_two() || min > 65_536 {
            return fail(format!(
                "block_size_min {min} must be a power of two <= 65536"
            ));
        }
        if !pref.is_power_of_two() || pref < min.max(512) {
            return fail(format!(
                "block_size_preferred {pref} must be a power of two >= max(min {min}, 512)"
            ));
        }
        if max < pref {
            return fail(format!(
                "block_size_max {max} must be >= block_size_preferred {pref}"
            ));
        }
        if self.size_bytes % u64::from(min) != 0 {
            return fail(format!(
                "size_bytes {} is not a multiple of block_size_min {min}",
                self.size_bytes
            ));
        }
        Ok(())
    }
}

/// Handshake configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Exports offered, in `NBD_OPT_LIST` order.
    pub exports: Vec<ExportInfo>,
    /// FORCEDTLS mode: every option other than `STARTTLS`/`ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up (`EXPORT_NAME` closes the connection). Implies that
    /// `STARTTLS` is accepted, whatever `tls_available` says.
    pub tls_required: bool,
    /// Whether `NBD_OPT_STARTTLS` is accepted (the caller can wrap the stream in TLS). When
    /// neither this nor `tls_required` is set, `STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    pub tls_available: bool,
}

/// Result of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export in [`HandshakeConfig::exports`].
    pub export_index: usize,
    /// Whether structured replies were negotiated (reads must then use structured replies).
    pub structured_replies: bool,
    /// Whether the client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
}

/// What the caller should do after [`Handshake::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeStep {
    /// Send `out`, then read more input and feed it (together with the unconsumed rest).
    NeedMore,
    /// Send `out`; the transmission phase starts with the next input byte (any unconsumed
    /// input already is transmission-phase data).
    Done(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send `out` (an ACK), then close.
    Abort,
    /// The client sent `NBD_OPT_STARTTLS` and it was accepted: send `out` (an ACK) in plain
    /// text, then run the TLS server handshake and keep calling `feed` with decrypted bytes.
    /// Any unconsumed plain-text input MUST be discarded (it would be injected data); a
    /// well-behaved client sends nothing after `STARTTLS` until TLS is up.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Finished,
    Failed,
}

/// Fixed-newstyle handshake state machine (server side). See the module documentation.
#[derive(Debug)]
pub struct Handshake {
    cfg: HandshakeConfig,
    state: State,
    greeted: bool,
    no_zeroes: bool,
    structured: bool,
    tls_active: bool,
}

/// Transmission flags advertised for `export` (the same value is sent by `EXPORT_NAME`,
/// `INFO` and `GO`).
///
/// Always: `HAS_FLAGS | SEND_FLUSH | SEND_FUA`. Writable exports add `SEND_TRIM |
/// SEND_WRITE_ZEROES`, read-only ones `READ_ONLY`. `CAN_MULTI_CONN` follows
/// [`ExportInfo::multi_conn`]. `SEND_DF` is set when structured replies are negotiated: the
/// server must then answer a `NBD_CMD_FLAG_DF` read with at most one data chunk (a single
/// `OFFSET_DATA` chunk satisfies this). `SEND_FAST_ZERO` is never advertised.
pub fn transmission_flags(export: &ExportInfo, structured_replies: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
    if export.read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    }
    if export.multi_conn {
        flags |= NBD_FLAG_CAN_MULTI_CONN;
    }
    if structured_replies {
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

/// Outcome of one option: keep negotiating or stop with a step.
type OptionOutcome = Result<Option<HandshakeStep>, ProtoError>;

impl Handshake {
    /// Creates the state machine; nothing is sent until [`Handshake::greeting`].
    pub fn new(cfg: HandshakeConfig) -> Self {
        Self {
            cfg,
            state: State::ClientFlags,
            greeted: false,
            no_zeroes: false,
            structured: false,
            tls_active: false,
        }
    }

    /// The configuration this handshake serves.
    pub fn config(&self) -> &HandshakeConfig {
        &self.cfg
    }

    /// Whether `STARTTLS` has been accepted on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Appends the server greeting: `NBDMAGIC`, `IHAVEOPT`, `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn greeting(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
        self.greeted = true;
    }

    /// Processes as many complete client messages from `input` as possible, appending replies
    /// to `out`, and returns the number of bytes consumed with the next step.
    ///
    /// The caller keeps `input[consumed..]` and passes it again, followed by newly received
    /// bytes, on the next call. At most [`OPTION_HEADER_BYTES`] + [`MAX_OPTION_DATA_BYTES`]
    /// bytes are ever needed at once. Processing stops right after a message that ends the
    /// negotiation (`Done`, `Abort`) or switches to TLS (`StartTls`).
    ///
    /// On `Err` the handshake is dead and the connection must be closed; `out` may hold
    /// replies to options processed earlier in the same call (sending them is optional).
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, HandshakeStep), ProtoError> {
        let result = self.feed_inner(input, out);
        if let Err(e) = &result {
            if self.state != State::Failed {
                tracing::debug!(error = %e.what, "nbd handshake failed");
            }
            self.state = State::Failed;
        }
        result
    }

    fn feed_inner(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(usize, HandshakeStep), ProtoError> {
        if !self.greeted {
            return Err(ProtoError::new("feed() called before greeting()"));
        }
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::ClientFlags => {
                    let Some(raw) = rest.get(..CLIENT_FLAGS_BYTES) else {
                        return Ok((pos, HandshakeStep::NeedMore));
                    };
                    pos += CLIENT_FLAGS_BYTES;
                    self.client_flags(be_u32(raw, 0))?;
                    self.state = State::Options;
                }
                State::Options => {
                    let Some(header) = rest.get(..OPTION_HEADER_BYTES) else {
                        return Ok((pos, HandshakeStep::NeedMore));
                    };
                    let magic = be_u64(header, 0);
                    if magic != NBD_IHAVEOPT {
                        return Err(ProtoError::new(format!(
                            "bad option magic {magic:#018x}, expected IHAVEOPT {NBD_IHAVEOPT:#018x}"
                        )));
                    }
                    let option = be_u32(header, 8);
                    let len = be_u32(header, 12);
                    if len > MAX_OPTION_DATA_BYTES {
                        return Err(ProtoError::new(format!(
                            "option {option} data length {len} exceeds limit \
                             {MAX_OPTION_DATA_BYTES}"
                        )));
                    }
                    let total = OPTION_HEADER_BYTES + len as usize;
                    let Some(data) = rest.get(OPTION_HEADER_BYTES..total) else {
                        return Ok((pos, HandshakeStep::NeedMore));
                    };
                    pos += total;
                    if let Some(step) = self.option(option, data, out)? {
                        return Ok((pos, step));
                    }
                }
                State::Finished => {
                    return Err(ProtoError::new("handshake input after negotiation ended"));
                }
                State::Failed => return Err(ProtoError::new("handshake already failed")),
            }
        }
    }

    fn client_flags(&mut self, flags: u32) -> Result<(), ProtoError> {
        if flags & NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(ProtoError::new(format!(
                "client flags {flags:#010x} lack FIXED_NEWSTYLE (only fixed newstyle is served)"
            )));
        }
        let unknown = flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        if unknown != 0 {
            return Err(ProtoError::new(format!(
                "unknown client flags {unknown:#010x}"
            )));
        }
        self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        tracing::trace!(option, len = data.len(), "nbd option");
        if self.cfg.tls_required
            && !self.tls_active
            && option != NBD_OPT_STARTTLS
            && option != NBD_OPT_ABORT
        {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(ProtoError::new(
                    "NBD_OPT_EXPORT_NAME before required STARTTLS",
                ));
            }
            reply_error(
                out,
                option,
                NBD_REP_ERR_TLS_REQD,
                "TLS is required: send STARTTLS",
            );
            return Ok(None);
        }
        match option {
            NBD_OPT_EXPORT_NAME => self.export_name(data, out),
            NBD_OPT_ABORT => {
                reply_header(out, option, NBD_REP_ACK, 0);
                self.state = State::Finished;
                Ok(Some(HandshakeStep::Abort))
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    reply_error(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                    return Ok(None);
                }
                for export in &self.cfg.exports {
                    let len = 4 + export.name.len() + export.description.len();
                    reply_header(out, option, NBD_REP_SERVER, len as u32);
                    out.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    out.extend_from_slice(export.name.as_bytes());
                    out.extend_from_slice(export.description.as_bytes());
                }
                reply_header(out, option, NBD_REP_ACK, 0);
                Ok(None)
            }
            NBD_OPT_STARTTLS => {
                if !data.is_empty() {
                    reply_error(out, option, NBD_REP_ERR_INVALID, "STARTTLS takes no data");
                } else if self.tls_active {
                    reply_error(out, option, NBD_REP_ERR_INVALID, "TLS is already active");
                } else if !(self.cfg.tls_available || self.cfg.tls_required) {
                    reply_error(out, option, NBD_REP_ERR_UNSUP, "TLS is not configured");
                } else {
                    reply_header(out, option, NBD_REP_ACK, 0);
                    self.tls_active = true;
                    // No negotiation state survives STARTTLS.
                    self.structured = false;
                    return Ok(Some(HandshakeStep::StartTls));
                }
                Ok(None)
            }
            NBD_OPT_INFO | NBD_OPT_GO => Ok(self.info_or_go(option, data, out)),
            NBD_OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    reply_header(out, option, NBD_REP_ACK, 0);
                    self.structured = true;
                } else {
                    reply_error(
                        out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                Ok(None)
            }
            _ => {
                let msg = format!("option {option} is not supported");
                reply_error(out, option, NBD_REP_ERR_UNSUP, &msg);
                Ok(None)
            }
        }
    }

    fn export_name(&mut self, name: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        let Some(export_index) = self.find_export(name) else {
            return Err(ProtoError::new(format!(
                "NBD_OPT_EXPORT_NAME: unknown export {}",
                echo(name)
            )));
        };
        let export = &self.cfg.exports[export_index];
        out.extend_from_slice(&export.size_bytes.to_be_bytes());
        out.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0; EXPORT_NAME_ZERO_PAD_BYTES]);
        }
        Ok(Some(self.finish(export_index)))
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Option<HandshakeStep> {
        let (name, requests) = match parse_info_request(data) {
            Ok(parsed) => parsed,
            Err(msg) => {
                reply_error(out, option, NBD_REP_ERR_INVALID, &msg);
                return None;
            }
        };
        let Some(export_index) = self.find_export(name) else {
            let msg = format!("unknown export {}", echo(name));
            reply_error(out, option, NBD_REP_ERR_UNKNOWN, &msg);
            return None;
        };
        let export = &self.cfg.exports[export_index];
        let requested = |info: u16| {
            requests
                .chunks_exact(2)
                .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
        };

        reply_header(out, option, NBD_REP_INFO, 12);
        out.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        out.extend_from_slice(&export.size_bytes.to_be_bytes());
        out.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());

        reply_header(out, option, NBD_REP_INFO, 14);
        out.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        out.extend_from_slice(&export.block_size_min.to_be_bytes());
        out.extend_from_slice(&export.block_size_preferred.to_be_bytes());
        out.extend_from_slice(&export.block_size_max.to_be_bytes());

        if requested(NBD_INFO_NAME) {
            reply_header(out, option, NBD_REP_INFO, 2 + export.name.len() as u32);
            out.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
            out.extend_from_slice(export.name.as_bytes());
        }
        if requested(NBD_INFO_DESCRIPTION) && !export.description.is_empty() {
            reply_header(
                out,
                option,
                NBD_REP_INFO,
                2 + export.description.len() as u32,
            );
            out.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
            out.extend_from_slice(export.description.as_bytes());
        }
        reply_header(out, option, NBD_REP_ACK, 0);

        (option == NBD_OPT_GO).then(|| self.finish(export_index))
    }

    fn finish(&mut self, export_index: usize) -> HandshakeStep {
        self.state = State::Finished;
        HandshakeStep::Done(Negotiated {
            export_index,
            structured_replies: self.structured,
            no_zeroes: self.no_zeroes,
        })
    }

    fn find_export(&self, name: &[u8]) -> Option<usize> {
        let exports = &self.cfg.exports;
        match exports.iter().position(|e| e.name.as_bytes() == name) {
            Some(i) => Some(i),
            None if name.is_empty() && !exports.is_empty() => Some(0),
            None => None,
        }
    }
}

/// Splits `NBD_OPT_INFO`/`NBD_OPT_GO` data into the name and the raw list of info requests.
fn parse_info_request(data: &[u8]) -> Result<(&[u8], &[u8]), String> {
    if data.len() < 6 {
        return Err(format!(
            "option data is {} bytes, need at least 6",
            data.len()
        ));
    }
    let name_len = be_u32(data, 0) as usize;
    if name_len > data.len() - 6 {
        return Err(format!(
            "name length {name_len} exceeds option data length {} minus 6",
            data.len()
        ));
    }
    let name = &data[4..4 + name_len];
    let count = usize::from(be_u16(data, 4 + name_len));
    let requests = &data[6 + name_len..];
    if requests.len() != count * 2 {
        return Err(format!(
            "{count} information requests need {} bytes, got {}",
            count * 2,
            requests.len()
        ));
    }
    Ok((name, requests))
}

fn reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, len: u32) {
    out.extend_from_slice(&NBD_OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn reply_error(out: &mut Vec<u8>, option: u32, reply_type: u32, msg: &str) {
    let msg = truncate_str(msg, MAX_STRING_BYTES);
    reply_header(out, option, reply_type, msg.len() as u32);
    out.extend_from_slice(msg.as_bytes());
}

/// Quoted, escaped, length-limited rendering of client-supplied bytes for messages.
fn echo(raw: &[u8]) -> String {
    let shown = &raw[..raw.len().min(MAX_ECHO_BYTES)];
    let text = String::from_utf8_lossy(shown);
    if shown.len() < raw.len() {
        format!("{text:?}... ({} bytes)", raw.len())
    } else {
        format!("{text:?}")
    }
}

fn truncate_str(s: &str, max_bytes: usize) -> &str {
    if s.len() <= max_bytes {
        return s;
    }
    let mut end = max_bytes;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut raw = [0; 4];
    raw.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(raw)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(raw)
}

// ---------------------------------------------------------------------------------------------
// Transmission phase.
// ---------------------------------------------------------------------------------------------

/// A decoded transmission request header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub kind: u16,
    /// Opaque client cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (for `NBD_CMD_WRITE`, also the payload that follows the header).
    pub length: u32,
}

impl Request {
    /// Payload bytes that follow this header on the wire (`length` for writes, else 0).
    pub fn payload_bytes(&self) -> u32 {
        if self.kind == NBD_CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    /// Encodes the request header (client side; used by tests and clients).
    pub fn encode(&self, out: &mut [u8; REQUEST_HEADER_BYTES]) {
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
    }
}

/// Decodes a request header. Only the magic is checked here; use [`validate_request`] for
/// the command, flags and range. A bad magic means the stream is out of sync: close.
pub fn parse_request(buf: &[u8; REQUEST_HEADER_BYTES]) -> Result<Request, ProtoError> {
    let magic = be_u32(buf, 0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtoError::new(format!(
            "bad request magic {magic:#010x}, expected {NBD_REQUEST_MAGIC:#010x}"
        )));
    }
    Ok(Request {
        flags: be_u16(buf, 4),
        kind: be_u16(buf, 6),
        cookie: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        length: be_u32(buf, 24),
    })
}

/// Command flags accepted for each supported command, or `None` for unsupported commands.
fn allowed_flags(kind: u16) -> Option<u16> {
    match kind {
        NBD_CMD_READ => Some(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF),
        NBD_CMD_WRITE | NBD_CMD_DISC | NBD_CMD_FLUSH | NBD_CMD_TRIM => Some(NBD_CMD_FLAG_FUA),
        NBD_CMD_WRITE_ZEROES => Some(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE),
        _ => None,
    }
}

/// Checks a request against the export; `Err` carries the NBD error to reply with.
///
/// Checks, in order:
/// 1. `NBD_CMD_WRITE` with `length > max_payload_bytes` → `NBD_EOVERFLOW`. The payload cannot
///    be skipped cheaply, so the caller must close the connection after (optionally) replying;
///    see [`reject_requires_disconnect`]. Every other rejected `WRITE` still has `length`
///    (at most `max_payload_bytes`) payload bytes on the wire which the caller must read and
///    drop before the next header.
/// 2. Unsupported command (`CACHE`, `BLOCK_STATUS`, unknown) → `NBD_EINVAL`.
/// 3. Flag not valid for the command (valid: `FUA` everywhere, `DF` on `READ`, `NO_HOLE` on
///    `WRITE_ZEROES`) → `NBD_EINVAL`.
/// 4. `DISC` and `FLUSH` are accepted here (offset and length are ignored).
/// 5. `WRITE`, `TRIM`, `WRITE_ZEROES` on a read-only export → `NBD_EPERM`.
/// 6. Zero length → `NBD_EINVAL`.
/// 7. `READ` with `length > max_payload_bytes` → `NBD_EOVERFLOW` (`TRIM` and `WRITE_ZEROES`
///    carry no payload and may exceed it).
/// 8. `offset + length` overflowing u64 or beyond `export_size_bytes` → `NBD_EINVAL`.
/// 9. `offset` or `length` not a multiple of `block_size_min_bytes` (0 counts as 1) →
///    `NBD_EINVAL`.
pub fn validate_request(
    req: &Request,
    export_size_bytes: u64,
    block_size_min_bytes: u32,
    max_payload_bytes: u32,
    read_only: bool,
) -> Result<(), u32> {
    if reject_requires_disconnect(req, max_payload_bytes) {
        return Err(NBD_EOVERFLOW);
    }
    let allowed = allowed_flags(req.kind).ok_or(NBD_EINVAL)?;
    if req.flags & !allowed != 0 {
        return Err(NBD_EINVAL);
    }
    match req.kind {
        NBD_CMD_DISC | NBD_CMD_FLUSH => return Ok(()),
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES if read_only => return Err(NBD_EPERM),
        _ => {}
    }
    if req.length == 0 {
        return Err(NBD_EINVAL);
    }
    if req.kind == NBD_CMD_READ && req.length > max_payload_bytes {
        return Err(NBD_EOVERFLOW);
    }
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= export_size_bytes => {}
        _ => return Err(NBD_EINVAL),
    }
    let align = u64::from(block_size_min_bytes.max(1));
    if req.offset % align != 0 || u64::from(req.length) % align != 0 {
        return Err(NBD_EINVAL);
    }
    Ok(())
}

/// Whether a request rejected by [`validate_request`] forces the connection to be closed:
/// true for an `NBD_CMD_WRITE` whose payload exceeds `max_payload_bytes` (the server will not
/// read that much data just to stay in sync).
pub fn reject_requires_disconnect(req: &Request, max_payload_bytes: u32) -> bool {
    req.kind == NBD_CMD_WRITE && req.length > max_payload_bytes
}

/// Encodes a simple reply header (`error` 0 for success). For a successful read the data
/// follows the header.
pub fn encode_simple_reply(out: &mut [u8; SIMPLE_REPLY_BYTES], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Encodes a structured reply chunk header; `length` counts the chunk payload bytes that
/// follow it.
pub fn encode_structured_chunk_header(
    out: &mut [u8; STRUCTURED_CHUNK_HEADER_BYTES],
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
) {
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Encodes the first [`OFFSET_DATA_HEADER_BYTES`] of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk;
/// `data_len_bytes` bytes of data must follow.
///
/// # Panics
///
/// If `data_len_bytes + 8` does not fit in u32.
pub fn encode_offset_data_header(
    out: &mut [u8; OFFSET_DATA_HEADER_BYTES],
    flags: u16,
    cookie: u64,
    offset: u64,
    data_len_bytes: u32,
) {
    let length = data_len_bytes
        .checked_add(8)
        .expect("OFFSET_DATA chunk length overflows u32");
    let (header, rest) = out.split_at_mut(STRUCTURED_CHUNK_HEADER_BYTES);
    encode_structured_chunk_header(
        header.try_into().expect("split at header size"),
        flags,
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        length,
    );
    rest.copy_from_slice(&offset.to_be_bytes());
}

/// Encodes a whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk (`hole_len_bytes` of zeroes at
/// `offset`).
pub fn encode_offset_hole_chunk(
    out: &mut [u8; OFFSET_HOLE_CHUNK_BYTES],
    flags: u16,
    cookie: u64,
    offset: u64,
    hole_len_bytes: u32,
) {
    let (header, rest) = out.split_at_mut(STRUCTURED_CHUNK_HEADER_BYTES);
    encode_structured_chunk_header(
        header.try_into().expect("split at header size"),
        flags,
        NBD_REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    );
    rest[0..8].copy_from_slice(&offset.to_be_bytes());
    rest[8..12].copy_from_slice(&hole_len_bytes.to_be_bytes());
}

/// Encodes an `NBD_REPLY_TYPE_ERROR` chunk into `out` and returns the bytes written.
///
/// `error` must be non-zero. The message is truncated (at a UTF-8 boundary) to fit `out` and
/// the protocol's 4096-byte string limit. Typically `flags` is [`NBD_REPLY_FLAG_DONE`].
///
/// # Panics
///
/// If `out` is shorter than [`ERROR_CHUNK_FIXED_BYTES`].
pub fn encode_error_chunk(
    out: &mut [u8],
    flags: u16,
    cookie: u64,
    error: u32,
    message: &str,
) -> usize {
    encode_error_chunk_impl(out, flags, cookie, error, message, None)
}

/// Encodes an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (error at `offset`) into `out` and returns
/// the bytes written; otherwise like [`encode_error_chunk`].
///
/// # Panics
///
/// If `out` is shorter than [`ERROR_OFFSET_CHUNK_FIXED_BYTES`].
pub fn encode_error_offset_chunk(
    out: &mut [u8],
    flags: u16,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
) -> usize {
    encode_error_chunk_impl(out, flags, cookie, error, message, Some(offset))
}

fn encode_error_chunk_impl(
    out: &mut [u8],
    flags: u16,
    cookie: u64,
    error: u32,
    message: &str,
    offset: Option<u64>,
) -> usize {
    debug_assert!(error != 0, "error chunks need a non-zero error");
    let (fixed, kind) = match offset {
        Some(_) => (ERROR_OFFSET_CHUNK_FIXED_BYTES, NBD_REPLY_TYPE_ERROR_OFFSET),
        None => (ERROR_CHUNK_FIXED_BYTES, NBD_REPLY_TYPE_ERROR),
    };
    assert!(
        out.len() >= fixed,
        "error chunk buffer of {} bytes < {fixed}",
        out.len()
    );
    let message = truncate_str(message, (out.len() - fixed).min(MAX_STRING_BYTES));
    let total = fixed + message.len();
    let payload = (total - STRUCTURED_CHUNK_HEADER_BYTES) as u32;
    let (header, rest) = out.split_at_mut(STRUCTURED_CHUNK_HEADER_BYTES);
    encode_structured_chunk_header(
        header.try_into().expect("split at header size"),
        flags,
        kind,
        cookie,
        payload,
    );
    rest[0..4].copy_from_slice(&error.to_be_bytes());
    rest[4..6].copy_from_slice(&(message.len() as u16).to_be_bytes());
    rest[6..6 + message.len()].copy_from_slice(message.as_bytes());
    if let Some(offset) = offset {
        rest[6 + message.len()..14 + message.len()].copy_from_slice(&offset.to_be_bytes());
    }
    total
}

/// Maps a host errno (from the backing I/O) to the NBD error to send; unknown values → EIO.
pub fn errno_to_nbd(errno: i32) -> u32 {
    if errno == libc::EPERM || errno == libc::EACCES || errno == libc::EROFS {
        NBD_EPERM
    } else if errno == libc::ENOMEM {
        NBD_ENOMEM
    } else if errno == libc::EINVAL {
        NBD_EINVAL
    } else if errno == libc::ENOSPC || errno == libc::EDQUOT || errno == libc::EFBIG {
        NBD_ENOSPC
    } else if errno == libc::EOVERFLOW {
        NBD_EOVERFLOW
    } else if errno == libc::ENOTSUP || errno == libc::EOPNOTSUPP {
        NBD_ENOTSUP
    } else if errno == libc::ESHUTDOWN {
        NBD_ESHUTDOWN
    } else {
        NBD_EIO
    }
}

/// Maps an I/O error to the NBD error to send ([`errno_to_nbd`]; no OS error → EIO).
pub fn io_error_to_nbd(err: &std::io::Error) -> u32 {
    err.raw_os_error().map_or(NBD_EIO, errno_to_nbd)
}

// ---------------------------------------------------------------------------------------------
// Client side helpers.
// ---------------------------------------------------------------------------------------------

/// Client side of the protocol: builders for handshake bytes and parsers for server replies.
/// Used by unit tests, integration tests and fuzzing.
pub mod client {
    use super::*;

    /// Appends the client flags (`FIXED_NEWSTYLE`, plus `NO_ZEROES` if asked).
    pub fn push_client_flags(out: &mut Vec<u8>, no_zeroes: bool) {
        let mut flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= NBD_FLAG_C_NO_ZEROES;
        }
        push_raw_client_flags(out, flags);
    }

    /// Appends arbitrary client flags (for negative tests).
    pub fn push_raw_client_flags(out: &mut Vec<u8>, flags: u32) {
        out.extend_from_slice(&flags.to_be_bytes());
    }

    /// Appends an option request with arbitrary data.
    pub fn push_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
        out.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    /// Appends `NBD_OPT_EXPORT_NAME`.
    pub fn push_export_name(out: &mut Vec<u8>, name: &str) {
        push_option(out, NBD_OPT_EXPORT_NAME, name.as_bytes());
    }

    /// Appends `NBD_OPT_INFO` or `NBD_OPT_GO` (`option`) for `name` with info requests.
    pub fn push_info_or_go(out: &mut Vec<u8>, option: u32, name: &str, info_requests: &[u16]) {
        let mut data = Vec::with_capacity(6 + name.len() + 2 * info_requests.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
        for info in info_requests {
            data.extend_from_slice(&info.to_be_bytes());
        }
        push_option(out, option, &data);
    }

    /// Parses the server greeting and returns its handshake flags.
    pub fn parse_greeting(buf: &[u8]) -> Result<u16, ProtoError> {
        if buf.len() < GREETING_BYTES {
            return Err(ProtoError::new(format!("greeting is {} bytes", buf.len())));
        }
        if be_u64(buf, 0) != NBD_MAGIC || be_u64(buf, 8) != NBD_IHAVEOPT {
            return Err(ProtoError::new("bad greeting magic"));
        }
        Ok(be_u16(buf, 16))
    }

    /// One option reply from the server.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct OptionReply<'a> {
        /// Option this replies to.
        pub option: u32,
        /// Reply type (`NBD_REP_*`).
        pub reply_type: u32,
        /// Reply data.
        pub data: &'a [u8],
    }

    /// Parses one option reply from the front of `buf`; `Ok(None)` if incomplete, else the
    /// reply and the bytes it occupies.
    pub fn parse_option_reply(buf: &[u8]) -> Result<Option<(OptionReply<'_>, usize)>, ProtoError> {
        let Some(header) = buf.get(..OPTION_REPLY_HEADER_BYTES) else {
            return Ok(None);
        };
        if be_u64(header, 0) != NBD_OPT_REPLY_MAGIC {
            return Err(ProtoError::new("bad option reply magic"));
        }
        let total = OPTION_REPLY_HEADER_BYTES + be_u32(header, 16) as usize;
        let Some(data) = buf.get(OPTION_REPLY_HEADER_BYTES..total) else {
            return Ok(None);
        };
        let reply = OptionReply {
            option: be_u32(header, 8),
            reply_type: be_u32(header, 12),
            data,
        };
        Ok(Some((reply, total)))
    }

    /// Parses all complete option replies in `buf` (allocates; for tests and tooling).
    pub fn parse_option_replies(mut buf: &[u8]) -> Result<Vec<OptionReply<'_>>, ProtoError> {
        let mut replies = Vec::new();
        while let Some((reply, used)) = parse_option_reply(buf)? {
            replies.push(reply);
            buf = &buf[used..];
        }
        if !buf.is_empty() {
            return Err(ProtoError::new(format!("{} trailing bytes", buf.len())));
        }
        Ok(replies)
    }

    /// A decoded `NBD_REP_INFO` payload.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Info<'a> {
        /// `NBD_INFO_EXPORT`.
        Export {
            /// Export size.
            size_bytes: u64,
            /// Transmission flags.
            transmission_flags: u16,
        },
        /// `NBD_INFO_NAME`.
        Name(&'a [u8]),
        /// `NBD_INFO_DESCRIPTION`.
        Description(&'a [u8]),
        /// `NBD_INFO_BLOCK_SIZE`.
        BlockSize {
            /// Minimum block size.
            min_bytes: u32,
            /// Preferred block size.
            preferred_bytes: u32,
            /// Maximum payload.
            max_bytes: u32,
        },
        /// Any other info type with its raw data.
        Other(u16, &'a [u8]),
    }

    /// Decodes the data of an `NBD_REP_INFO` reply.
    pub fn parse_info(data: &[u8]) -> Result<Info<'_>, ProtoError> {
        if data.len() < 2 {
            return Err(ProtoError::new("NBD_REP_INFO shorter than 2 bytes"));
        }
        let kind = be_u16(data, 0);
        let body = &data[2..];
        let bad = || ProtoError::new(format!("info {kind} has bad length {}", body.len()));
        Ok(match kind {
            NBD_INFO_EXPORT if body.len() == 10 => Info::Export {
                size_bytes: be_u64(body, 0),
                transmission_flags: be_u16(body, 8),
            },
            NBD_INFO_BLOCK_SIZE if body.len() == 12 => Info::BlockSize {
                min_bytes: be_u32(body, 0),
                preferred_bytes: be_u32(body, 4),
                max_bytes: be_u32(body, 8),
            },
            NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => return Err(bad()),
            NBD_INFO_NAME => Info::Name(body),
            NBD_INFO_DESCRIPTION => Info::Description(body),
            _ => Info::Other(kind, body),
        })
    }

    /// Reply to `NBD_OPT_EXPORT_NAME`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ExportNameReply {
        /// Export size.
        pub size_bytes: u64,
        /// Transmission flags.
        pub transmission_flags: u16,
    }

    /// Parses the `NBD_OPT_EXPORT_NAME` reply (10 bytes, plus 124 zeroes unless `no_zeroes`);
    /// `Ok(None)` if incomplete.
    pub fn parse_export_name_reply(
        buf: &[u8],
        no_zeroes: bool,
    ) -> Result<Option<(ExportNameReply, usize)>, ProtoError> {
        let total = if no_zeroes {
            10
        } else {
            10 + EXPORT_NAME_ZERO_PAD_BYTES
        };
        let Some(raw) = buf.get(..total) else {
            return Ok(None);
        };
        if raw[10..].iter().any(|&b| b != 0) {
            return Err(ProtoError::new("non-zero padding after export name reply"));
        }
        let reply = ExportNameReply {
            size_bytes: be_u64(raw, 0),
            transmission_flags: be_u16(raw, 8),
        };
        Ok(Some((reply, total)))
    }

    /// Parses a simple reply header into `(error, cookie)`.
    pub fn parse_simple_reply(buf: &[u8; SIMPLE_REPLY_BYTES]) -> Result<(u32, u64), ProtoError> {
        if be_u32(buf, 0) != NBD_SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::new("bad simple reply magic"));
        }
        Ok((be_u32(buf, 4), be_u64(buf, 8)))
    }

    /// A decoded structured reply chunk header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ChunkHeader {
        /// `NBD_REPLY_FLAG_*`.
        pub flags: u16,
        /// `NBD_REPLY_TYPE_*`.
        pub kind: u16,
        /// Cookie of the request.
        pub cookie: u64,
        /// Payload bytes following the header.
        pub length: u32,
    }

    /// Parses a structured reply chunk header.
    pub fn parse_structured_chunk_header(
        buf: &[u8; STRUCTURED_CHUNK_HEADER_BYTES],
    ) -> Result<ChunkHeader, ProtoError> {
        if be_u32(buf, 0) != NBD_STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::new("bad structured reply magic"));
        }
        Ok(ChunkHeader {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            cookie: be_u64(buf, 8),
            length: be_u32(buf, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn cfg() -> HandshakeConfig {
        HandshakeConfig {
            exports: vec![
                ExportInfo {
                    name: "disk0".into(),
                    size_bytes: 64 * MIB,
                    block_size_min: 512,
                    block_size_preferred: 4096,
                    block_size_max: 1 << 20,
                    read_only: false,
                    multi_conn: true,
                    description: "first disk".into(),
                },
                ExportInfo {
                    name: "ro".into(),
                    size_bytes: MIB,
                    block_size_min: 4096,
                    block_size_preferred: 4096,
                    block_size_max: 1 << 25,
                    read_only: true,
                    multi_conn: false,
                    description: String::new(),
                },
            ],
            tls_required: false,
            tls_available: false,
        }
    }

    /// What a simulated caller saw: all server output after the greeting, every non-NeedMore
    /// step, the final result and how many input bytes were left unconsumed.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        out: Vec<u8>,
        steps: Vec<HandshakeStep>,
        error: Option<ProtoError>,
        leftover: usize,
    }

    /// Drives a handshake like the connection code would, delivering `input` in pieces whose
    /// sizes come from `piece`. `StartTls` is treated as a transparent TLS layer.
    fn drive(cfg: HandshakeConfig, input: &[u8], piece: &mut dyn FnMut() -> usize) -> Outcome {
        let mut hs = Handshake::new(cfg);
        let mut greeting = Vec::new();
        hs.greeting(&mut greeting);
        assert_eq!(
            parse_greeting(&greeting),
            Ok(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        );
        let mut out = Vec::new();
        let mut steps = Vec::new();
        let mut pending = Vec::new();
        let mut fed = 0;
        loop {
            let (used, step) = match hs.feed(&pending, &mut out) {
                Ok(r) => r,
                Err(e) => {
                    return Outcome {
                        out,
                        steps,
                        error: Some(e),
                        leftover: 0,
                    }
                }
            };
            assert!(used <= pending.len());
            pending.drain(..used);
            match step {
                HandshakeStep::NeedMore => {
                    if fed == input.len() {
                        let leftover = pending.len();
                        return Outcome {
                            out,
                            steps,
                            error: None,
                            leftover,
                        };
                    }
                    let n = piece().clamp(1, input.len() - fed);
                    pending.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
                HandshakeStep::StartTls => steps.push(step),
                _ => {
                    steps.push(step);
                    let leftover = pending.len() + input.len() - fed;
                    return Outcome {
                        out,
                        steps,
                        error: None,
                        leftover,
                    };
                }
            }
        }
    }

    /// Runs `input` whole, byte by byte and in pseudo-random pieces; all must agree.
    fn run(cfg: HandshakeConfig, input: &[u8]) -> Outcome {
        let whole = drive(cfg.clone(), input, &mut || usize::MAX);
        let bytewise = drive(cfg.clone(), input, &mut || 1);
        assert_eq!(whole, bytewise, "byte-by-byte feeding differs");
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..8 {
            let mut rng = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % 23) as usize + 1
            };
            assert_eq!(
                whole,
                drive(cfg.clone(), input, &mut rng),
                "random split differs"
            );
        }
        whole
    }

    fn flags(no_zeroes: bool) -> Vec<u8> {
        let mut v = Vec::new();
        push_client_flags(&mut v, no_zeroes);
        v
    }

    fn done(export_index: usize, structured_replies: bool, no_zeroes: bool) -> HandshakeStep {
        HandshakeStep::Done(Negotiated {
            export_index,
            structured_replies,
            no_zeroes,
        })
    }

    fn infos<'a>(replies: &[OptionReply<'a>]) -> Vec<Info<'a>> {
        replies
            .iter()
            .filter(|r| r.reply_type == NBD_REP_INFO)
            .map(|r| parse_info(r.data).unwrap())
            .collect()
    }

    #[test]
    fn magic_constants_match_spec() {
        assert_eq!(NBD_MAGIC.to_be_bytes(), *b"NBDMAGIC");
        assert_eq!(NBD_IHAVEOPT.to_be_bytes(), *b"IHAVEOPT");
        assert_eq!(NBD_OPT_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(NBD_REP_ERR_BLOCK_SIZE_REQD, 0x8000_0008);
        assert_eq!(NBD_REPLY_TYPE_ERROR, 32769);
        assert_eq!(NBD_REPLY_TYPE_ERROR_OFFSET, 32770);
    }

    #[test]
    fn go_with_block_size() {
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_GO, "disk0", &[NBD_INFO_BLOCK_SIZE]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, false, true)]);
        assert_eq!(o.leftover, 0);
        let replies = parse_option_replies(&o.out).unwrap();
        assert!(replies.iter().all(|r| r.option == NBD_OPT_GO));
        assert_eq!(replies.last().unwrap().reply_type, NBD_REP_ACK);
        let flags = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN;
        assert_eq!(
            infos(&replies),
            vec![
                Info::Export {
                    size_bytes: 64 * MIB,
                    transmission_flags: flags
                },
                Info::BlockSize {
                    min_bytes: 512,
                    preferred_bytes: 4096,
                    max_bytes: 1 << 20
                },
            ]
        );
    }

    #[test]
    fn go_sends_block_size_even_unrequested_and_name_description_on_request() {
        let mut input = flags(false);
        push_info_or_go(
            &mut input,
            NBD_OPT_GO,
            "disk0",
            &[NBD_INFO_NAME, NBD_INFO_DESCRIPTION],
        );
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, false, false)]);
        let replies = parse_option_replies(&o.out).unwrap();
        let infos = infos(&replies);
        assert_eq!(infos.len(), 4);
        assert!(matches!(infos[1], Info::BlockSize { min_bytes: 512, .. }));
        assert_eq!(infos[2], Info::Name(b"disk0"));
        assert_eq!(infos[3], Info::Description(b"first disk"));
    }

    #[test]
    fn info_does_not_finish_then_go_does() {
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_INFO, "ro", &[]);
        push_info_or_go(&mut input, NBD_OPT_GO, "ro", &[NBD_INFO_DESCRIPTION, 999]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(1, false, true)]);
        let replies = parse_option_replies(&o.out).unwrap();
        let types: Vec<_> = replies.iter().map(|r| (r.option, r.reply_type)).collect();
        assert_eq!(
            types,
            vec![
                (NBD_OPT_INFO, NBD_REP_INFO),
                (NBD_OPT_INFO, NBD_REP_INFO),
                (NBD_OPT_INFO, NBD_REP_ACK),
                (NBD_OPT_GO, NBD_REP_INFO),
                (NBD_OPT_GO, NBD_REP_INFO),
                (NBD_OPT_GO, NBD_REP_ACK),
            ]
        );
        let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA;
        assert_eq!(
            parse_info(replies[3].data).unwrap(),
            Info::Export {
                size_bytes: MIB,
                transmission_flags: flags | NBD_FLAG_READ_ONLY
            }
        );
    }

    #[test]
    fn info_only_needs_more() {
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_INFO, "disk0", &[]);
        let o = run(cfg(), &input);
        assert!(o.steps.is_empty() && o.error.is_none());
        assert_eq!(parse_option_replies(&o.out).unwrap().len(), 3);
    }

    #[test]
    fn list_exports() {
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_LIST, &[]);
        push_option(&mut input, NBD_OPT_LIST, b"x");
        let o = run(cfg(), &input);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies.len(), 4);
        assert_eq!(replies[0].reply_type, NBD_REP_SERVER);
        assert_eq!(replies[0].data, b"\0\0\0\x05disk0first disk");
        assert_eq!(replies[1].reply_type, NBD_REP_SERVER);
        assert_eq!(replies[1].data, b"\0\0\0\x02ro");
        assert_eq!(replies[2].reply_type, NBD_REP_ACK);
        assert_eq!(replies[3].reply_type, NBD_REP_ERR_INVALID);
    }

    #[test]
    fn export_name_with_zeroes() {
        let mut input = flags(false);
        push_export_name(&mut input, "ro");
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(1, false, false)]);
        assert_eq!(o.out.len(), 10 + EXPORT_NAME_ZERO_PAD_BYTES);
        let (reply, used) = parse_export_name_reply(&o.out, false).unwrap().unwrap();
        assert_eq!(used, o.out.len());
        assert_eq!(reply.size_bytes, MIB);
        assert_ne!(reply.transmission_flags & NBD_FLAG_READ_ONLY, 0);
    }

    #[test]
    fn export_name_no_zeroes_keeps_pipelined_request() {
        let mut input = flags(true);
        push_export_name(&mut input, "disk0");
        let mut req = [0; REQUEST_HEADER_BYTES];
        Request {
            kind: NBD_CMD_FLUSH,
            cookie: 7,
            ..Request::default()
        }
        .encode(&mut req);
        input.extend_from_slice(&req);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, false, true)]);
        assert_eq!(o.out.len(), 10);
        let (reply, _) = parse_export_name_reply(&o.out, true).unwrap().unwrap();
        assert_eq!(reply.size_bytes, 64 * MIB);
        assert_eq!(
            o.leftover, REQUEST_HEADER_BYTES,
            "request after the handshake is not eaten"
        );
    }

    #[test]
    fn empty_name_selects_default_export() {
        let mut input = flags(true);
        push_export_name(&mut input, "");
        assert_eq!(run(cfg(), &input).steps, vec![done(0, false, true)]);
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_GO, "", &[]);
        assert_eq!(run(cfg(), &input).steps, vec![done(0, false, true)]);
        let empty = HandshakeConfig::default();
        let o = run(empty, &input);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_UNKNOWN);
    }

    #[test]
    fn structured_reply() {
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_STRUCTURED_REPLY, b"junk");
        push_option(&mut input, NBD_OPT_STRUCTURED_REPLY, &[]);
        push_info_or_go(&mut input, NBD_OPT_GO, "disk0", &[]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, true, true)]);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_INVALID);
        assert_eq!(replies[1].reply_type, NBD_REP_ACK);
        let Info::Export {
            transmission_flags, ..
        } = parse_info(replies[2].data).unwrap()
        else {
            panic!("first info must be NBD_INFO_EXPORT");
        };
        assert_ne!(transmission_flags & NBD_FLAG_SEND_DF, 0);
    }

    #[test]
    fn unknown_export() {
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_GO, "nope", &[NBD_INFO_BLOCK_SIZE]);
        push_info_or_go(&mut input, NBD_OPT_GO, "disk0", &[]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, false, true)]);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_UNKNOWN);
        assert_eq!(replies[0].data, b"unknown export \"nope\"");

        let mut input = flags(true);
        push_export_name(&mut input, "nope");
        let o = run(cfg(), &input);
        assert!(o.error.unwrap().what.contains("unknown export \"nope\""));
        assert!(o.out.is_empty());
    }

    #[test]
    fn huge_unknown_name_is_echoed_truncated() {
        let name = "x".repeat(10_000);
        let mut input = flags(true);
        push_info_or_go(&mut input, NBD_OPT_INFO, &name, &[]);
        let o = drive(cfg(), &input, &mut || usize::MAX);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies[0].reply_type, NBD_REP_ERR_UNKNOWN);
        assert!(replies[0].data.len() < 400);
    }

    #[test]
    fn malformed_info_requests_get_err_invalid() {
        let mut input = flags(true);
        // Name length beyond the option data.
        push_option(&mut input, NBD_OPT_GO, &[0, 0, 0, 9, b'a', 0, 0]);
        // Too short to hold the name length and request count.
        push_option(&mut input, NBD_OPT_GO, &[0, 0, 0]);
        // Request count disagrees with the data length.
        push_option(&mut input, NBD_OPT_INFO, &[0, 0, 0, 1, b'a', 0, 2, 0, 3]);
        // Name length near u32::MAX must not overflow.
        push_option(&mut input, NBD_OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]);
        let o = run(cfg(), &input);
        assert!(o.error.is_none() && o.steps.is_empty());
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(replies.len(), 4);
        assert!(replies.iter().all(|r| r.reply_type == NBD_REP_ERR_INVALID));
        assert!(std::str::from_utf8(replies[0].data)
            .unwrap()
            .contains("name length 9"));
    }

    #[test]
    fn unknown_option_is_unsupported_and_abort_acks() {
        let mut input = flags(true);
        push_option(&mut input, 42, b"abc");
        push_option(&mut input, NBD_OPT_ABORT, &[]);
        push_option(&mut input, NBD_OPT_LIST, &[]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![HandshakeStep::Abort]);
        assert_eq!(o.leftover, OPTION_HEADER_BYTES);
        let replies = parse_option_replies(&o.out).unwrap();
        assert_eq!(
            (replies[0].option, replies[0].reply_type),
            (42, NBD_REP_ERR_UNSUP)
        );
        assert_eq!(
            (replies[1].option, replies[1].reply_type),
            (NBD_OPT_ABORT, NBD_REP_ACK)
        );
    }

    #[test]
    fn garbage_magic_and_flags() {
        let mut input = flags(true);
        input.extend_from_slice(b"GARBAGE!GARBAGE!");
        let o = run(cfg(), &input);
        assert!(o.error.unwrap().what.contains("bad option magic"));

        let mut input = Vec::new();
        push_raw_client_flags(&mut input, 0);
        assert!(run(cfg(), &input)
            .error
            .unwrap()
            .what
            .contains("FIXED_NEWSTYLE"));

        let mut input = Vec::new();
        push_raw_client_flags(&mut input, NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
        assert!(run(cfg(), &input)
            .error
            .unwrap()
            .what
            .contains("unknown client flags"));
    }

    #[test]
    fn oversized_option_fails_from_header_alone() {
        let mut hs = Handshake::new(cfg());
        let mut out = Vec::new();
        hs.greeting(&mut out);
        out.clear();
        let mut input = flags(true);
        input.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        input.extend_from_slice(&(MAX_OPTION_DATA_BYTES + 1).to_be_bytes());
        let err = hs.feed(&input, &mut out).unwrap_err();
        assert!(err.what.contains("exceeds limit"), "{err}");
        assert!(out.is_empty());
        // The handshake stays dead.
        assert!(hs.feed(&[], &mut out).is_err());

        // Exactly at the limit is fine (and the option is still answered).
        let mut input = flags(true);
        push_option(&mut input, 77, &vec![0; MAX_OPTION_DATA_BYTES as usize]);
        let o = drive(cfg(), &input, &mut || 4096);
        assert!(o.error.is_none());
        assert_eq!(
            parse_option_replies(&o.out).unwrap()[0].reply_type,
            NBD_REP_ERR_UNSUP
        );
    }

    #[test]
    fn feed_before_greeting_and_after_done_fail() {
        let mut hs = Handshake::new(cfg());
        let mut out = Vec::new();
        assert!(hs.feed(&flags(true), &mut out).is_err());

        let mut hs = Handshake::new(cfg());
        hs.greeting(&mut out);
        let mut input = flags(true);
        push_export_name(&mut input, "disk0");
        assert_eq!(
            hs.feed(&input, &mut out).unwrap(),
            (input.len(), done(0, false, true))
        );
        assert!(hs.feed(&input, &mut out).is_err());
    }

    #[test]
    fn tls_required() {
        let mut c = cfg();
        c.tls_required = true;
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_STRUCTURED_REPLY, &[]);
        push_info_or_go(&mut input, NBD_OPT_GO, "disk0", &[]);
        push_option(&mut input, NBD_OPT_LIST, &[]);
        push_option(&mut input, NBD_OPT_STARTTLS, &[]);
        push_option(&mut input, NBD_OPT_STARTTLS, &[]);
        push_info_or_go(&mut input, NBD_OPT_GO, "disk0", &[]);
        let o = run(c.clone(), &input);
        // Structured replies negotiated before STARTTLS are forgotten.
        assert_eq!(o.steps, vec![HandshakeStep::StartTls, done(0, false, true)]);
        let replies = parse_option_replies(&o.out).unwrap();
        let types: Vec<_> = replies.iter().map(|r| r.reply_type).collect();
        assert_eq!(
            types,
            vec![
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ACK,
                NBD_REP_ERR_INVALID,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_ACK,
            ]
        );

        let mut input = flags(true);
        push_export_name(&mut input, "disk0");
        assert!(run(c.clone(), &input)
            .error
            .unwrap()
            .what
            .contains("STARTTLS"));

        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_ABORT, &[]);
        assert_eq!(run(c, &input).steps, vec![HandshakeStep::Abort]);
    }

    #[test]
    fn starttls_stops_feeding_at_the_option() {
        let mut c = cfg();
        c.tls_available = true;
        let mut hs = Handshake::new(c);
        let mut out = Vec::new();
        hs.greeting(&mut out);
        out.clear();
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_STARTTLS, &[]);
        let tls_end = input.len();
        push_option(&mut input, NBD_OPT_LIST, &[]);
        let (used, step) = hs.feed(&input, &mut out).unwrap();
        assert_eq!((used, step), (tls_end, HandshakeStep::StartTls));
        assert!(hs.tls_active());
        let replies = parse_option_replies(&out).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].reply_type, NBD_REP_ACK);
    }

    #[test]
    fn starttls_unavailable_or_with_data() {
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_STARTTLS, &[]);
        let o = run(cfg(), &input);
        assert!(o.steps.is_empty());
        assert_eq!(
            parse_option_replies(&o.out).unwrap()[0].reply_type,
            NBD_REP_ERR_UNSUP
        );

        let mut c = cfg();
        c.tls_available = true;
        let mut input = flags(true);
        push_option(&mut input, NBD_OPT_STARTTLS, b"x");
        let o = run(c, &input);
        assert!(o.steps.is_empty());
        assert_eq!(
            parse_option_replies(&o.out).unwrap()[0].reply_type,
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn long_script_byte_by_byte() {
        let mut input = flags(false);
        push_option(&mut input, NBD_OPT_LIST, &[]);
        push_option(&mut input, 9, b"meta");
        push_option(&mut input, NBD_OPT_STRUCTURED_REPLY, &[]);
        push_info_or_go(&mut input, NBD_OPT_INFO, "nope", &[]);
        push_info_or_go(&mut input, NBD_OPT_INFO, "ro", &[NBD_INFO_NAME]);
        push_info_or_go(
            &mut input,
            NBD_OPT_GO,
            "disk0",
            &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME],
        );
        input.extend_from_slice(&[1, 2, 3]);
        let o = run(cfg(), &input);
        assert_eq!(o.steps, vec![done(0, true, false)]);
        assert_eq!(o.leftover, 3);
        assert_eq!(parse_option_replies(&o.out).unwrap().len(), 14);
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn parse_request_roundtrip_and_bad_magic() {
        let r = Request {
            flags: NBD_CMD_FLAG_FUA,
            kind: NBD_CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1_0000_0000,
            length: 4096,
        };
        let mut buf = [0; REQUEST_HEADER_BYTES];
        r.encode(&mut buf);
        assert_eq!(&buf[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request(&buf), Ok(r));
        assert_eq!(r.payload_bytes(), 4096);
        assert_eq!(req(NBD_CMD_READ, 0, 0, 4096).payload_bytes(), 0);
        buf[0] ^= 1;
        assert!(parse_request(&buf)
            .unwrap_err()
            .what
            .contains("bad request magic"));
    }

    #[test]
    fn validate_request_edge_cases() {
        let size = 64 * MIB;
        let v = |r: Request| validate_request(&r, size, 512, 1 << 20, false);
        let v_ro = |r: Request| validate_request(&r, size, 512, 1 << 20, true);

        assert_eq!(v(req(NBD_CMD_READ, 0, 0, 4096)), Ok(()));
        assert_eq!(
            v(req(
                NBD_CMD_READ,
                NBD_CMD_FLAG_DF | NBD_CMD_FLAG_FUA,
                0,
                512
            )),
            Ok(())
        );
        assert_eq!(
            v(req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, size - 512, 512)),
            Ok(())
        );
        assert_eq!(
            v(req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1 << 24)),
            Ok(())
        );
        assert_eq!(
            v(req(NBD_CMD_TRIM, 0, 0, 1 << 25)),
            Ok(()),
            "trim may exceed max payload"
        );
        assert_eq!(v(req(NBD_CMD_FLUSH, 0, 0, 0)), Ok(()));
        assert_eq!(v(req(NBD_CMD_DISC, 0, 0, 0)), Ok(()));
        assert_eq!(v_ro(req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0)), Ok(()));
        assert_eq!(v_ro(req(NBD_CMD_READ, 0, 0, 512)), Ok(()));

        // Range.
        assert_eq!(v(req(NBD_CMD_READ, 0, size, 512)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_READ, 0, size - 512, 1024)), Err(NBD_EINVAL));
        assert_eq!(
            v(req(NBD_CMD_WRITE, 0, u64::MAX - 511, 512)),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            validate_request(
                &req(NBD_CMD_READ, 0, u64::MAX - 1, 4),
                u64::MAX,
                1,
                1 << 20,
                false
            ),
            Err(NBD_EINVAL),
            "offset + length overflows u64"
        );
        assert_eq!(
            validate_request(
                &req(NBD_CMD_READ, 0, u64::MAX - 4, 4),
                u64::MAX,
                1,
                1 << 20,
                false
            ),
            Ok(())
        );
        // Zero length, alignment.
        assert_eq!(v(req(NBD_CMD_READ, 0, 0, 0)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_TRIM, 0, 0, 0)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_READ, 0, 1, 512)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_WRITE, 0, 512, 100)), Err(NBD_EINVAL));
        assert_eq!(
            validate_request(&req(NBD_CMD_READ, 0, 1, 3), 10, 0, 10, false),
            Ok(())
        );
        // Payload limit.
        assert_eq!(
            v(req(NBD_CMD_READ, 0, 0, (1 << 20) + 512)),
            Err(NBD_EOVERFLOW)
        );
        let big_write = req(NBD_CMD_WRITE, 0, 0, (1 << 20) + 512);
        assert_eq!(v(big_write), Err(NBD_EOVERFLOW));
        assert_eq!(
            v_ro(big_write),
            Err(NBD_EOVERFLOW),
            "oversized write wins over EPERM"
        );
        assert!(reject_requires_disconnect(&big_write, 1 << 20));
        assert!(!reject_requires_disconnect(
            &req(NBD_CMD_WRITE, 0, 0, 1 << 20),
            1 << 20
        ));
        assert!(!reject_requires_disconnect(
            &req(NBD_CMD_READ, 0, 0, u32::MAX),
            1 << 20
        ));
        // Read-only.
        assert_eq!(v_ro(req(NBD_CMD_WRITE, 0, 0, 512)), Err(NBD_EPERM));
        assert_eq!(v_ro(req(NBD_CMD_TRIM, 0, 0, 512)), Err(NBD_EPERM));
        assert_eq!(v_ro(req(NBD_CMD_WRITE_ZEROES, 0, 0, 512)), Err(NBD_EPERM));
        // Commands and flags.
        assert_eq!(v(req(NBD_CMD_BLOCK_STATUS, 0, 0, 512)), Err(NBD_EINVAL));
        assert_eq!(v(req(NBD_CMD_CACHE, 0, 0, 512)), Err(NBD_EINVAL));
        assert_eq!(v(req(99, 0, 0, 512)), Err(NBD_EINVAL));
        assert_eq!(
            v(req(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 512)),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            v(req(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 512)),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            v(req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512)),
            Err(NBD_EINVAL)
        );
        assert_eq!(v(req(NBD_CMD_READ, 0x8000, 0, 512)), Err(NBD_EINVAL));
    }

    #[test]
    fn reply_encoders() {
        let mut simple = [0; SIMPLE_REPLY_BYTES];
        encode_simple_reply(&mut simple, NBD_EIO, 42);
        assert_eq!(parse_simple_reply(&simple), Ok((NBD_EIO, 42)));

        let mut data = [0; OFFSET_DATA_HEADER_BYTES];
        encode_offset_data_header(&mut data, NBD_REPLY_FLAG_DONE, 9, 4096, 512);
        let h = parse_structured_chunk_header(data[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: NBD_REPLY_FLAG_DONE,
                kind: NBD_REPLY_TYPE_OFFSET_DATA,
                cookie: 9,
                length: 520
            }
        );
        assert_eq!(be_u64(&data, 20), 4096);

        let mut hole = [0; OFFSET_HOLE_CHUNK_BYTES];
        encode_offset_hole_chunk(&mut hole, 0, 9, 8192, 4096);
        let h = parse_structured_chunk_header(hole[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.kind, h.length), (NBD_REPLY_TYPE_OFFSET_HOLE, 12));
        assert_eq!((be_u64(&hole, 20), be_u32(&hole, 28)), (8192, 4096));

        let mut buf = [0xaa; 64];
        let n = encode_error_chunk(&mut buf, NBD_REPLY_FLAG_DONE, 5, NBD_EIO, "disk on fire");
        assert_eq!(n, ERROR_CHUNK_FIXED_BYTES + 12);
        let h = parse_structured_chunk_header(buf[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.kind, h.length as usize), (NBD_REPLY_TYPE_ERROR, n - 20));
        assert_eq!((be_u32(&buf, 20), be_u16(&buf, 24)), (NBD_EIO, 12));
        assert_eq!(&buf[26..n], b"disk on fire");

        // Truncated to the buffer at a UTF-8 boundary ("é" is two bytes).
        let mut small = [0; ERROR_CHUNK_FIXED_BYTES + 3];
        let n = encode_error_chunk(&mut small, 0, 5, NBD_EINVAL, "aéé");
        assert_eq!(n, ERROR_CHUNK_FIXED_BYTES + 3);
        assert_eq!(&small[26..n], "aé".as_bytes());

        let mut buf = [0; 64];
        let n = encode_error_offset_chunk(&mut buf, 1, 5, NBD_EIO, "bad", 1 << 40);
        assert_eq!(n, ERROR_OFFSET_CHUNK_FIXED_BYTES + 3);
        let h = parse_structured_chunk_header(buf[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            (h.kind, h.length as usize),
            (NBD_REPLY_TYPE_ERROR_OFFSET, n - 20)
        );
        assert_eq!(&buf[26..29], b"bad");
        assert_eq!(be_u64(&buf, 29), 1 << 40);
    }

    #[test]
    #[should_panic(expected = "overflows")]
    fn offset_data_header_rejects_overflowing_length() {
        encode_offset_data_header(&mut [0; OFFSET_DATA_HEADER_BYTES], 0, 0, 0, u32::MAX - 7);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno_to_nbd(libc::EROFS), NBD_EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), NBD_ENOTSUP);
        assert_eq!(errno_to_nbd(libc::EBADF), NBD_EIO);
        assert_eq!(
            io_error_to_nbd(&std::io::Error::from_raw_os_error(libc::ENOMEM)),
            NBD_ENOMEM
        );
        assert_eq!(io_error_to_nbd(&std::io::Error::other("x")), NBD_EIO);
    }

    #[test]
    fn export_validation() {
        let c = cfg();
        assert_eq!(c.exports[0].validate(), Ok(()));
        assert_eq!(c.exports[1].validate(), Ok(()));
        let mut e = c.exports[0].clone();
        e.block_size_min = 3;
        assert!(e.validate().is_err());
        let mut e = c.exports[0].clone();
        e.block_size_preferred = 256;
        assert!(e.validate().is_err());
        let mut e = c.exports[0].clone();
        e.block_size_max = 2048;
        assert!(e.validate().is_err());
        let mut e = c.exports[0].clone();
        e.size_bytes += 1;
        assert!(e.validate().is_err());
        let mut e = c.exports[0].clone();
        e.name = "a\0b".into();
        assert!(e.validate().is_err());
    }
}
