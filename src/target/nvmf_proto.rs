//! Sans-I/O NVMe/TCP PDU codec (NVMe/TCP transport 1.0) and the NVMe
//! structures carried in it (NVMe Base 2.0: SQE, CQE, status codes, Fabrics
//! Connect data), shared by the target (`target::nvmf`) and the initiator
//! (`bdev::nvmf`). No sockets here: [`decode`] looks at received bytes and says
//! what PDU starts there (or that more bytes are needed), the `encode_*`
//! functions write PDUs into caller buffers without allocating.
//!
//! Every PDU starts with an 8-byte common header: type, flags, HLEN, PDO and
//! PLEN (little-endian). A header digest (CRC32C of the HLEN header bytes)
//! follows the header when negotiated; data starts at PDO and is followed by a
//! data digest (CRC32C of the data) when negotiated. ICReq/ICResp and TermReq
//! never carry digests.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// PDU types, flags and fixed sizes.
// ---------------------------------------------------------------------------------------------

pub const PDU_ICREQ: u8 = 0x00;
pub const PDU_ICRESP: u8 = 0x01;
pub const PDU_H2C_TERM_REQ: u8 = 0x02;
pub const PDU_C2H_TERM_REQ: u8 = 0x03;
pub const PDU_CAPSULE_CMD: u8 = 0x04;
pub const PDU_CAPSULE_RESP: u8 = 0x05;
pub const PDU_H2C_DATA: u8 = 0x06;
pub const PDU_C2H_DATA: u8 = 0x07;
pub const PDU_R2T: u8 = 0x09;

/// Common-header flag: a header digest follows the PDU header.
pub const FLAG_HDGST: u8 = 0x01;
/// Common-header flag: a data digest follows the PDU data.
pub const FLAG_DDGST: u8 = 0x02;
/// H2CData/C2HData: the last data PDU of the command (or of the R2T).
pub const FLAG_DATA_LAST: u8 = 0x04;
/// C2HData: the command succeeded; no CapsuleResp follows (SQ flow control disabled).
pub const FLAG_DATA_SUCCESS: u8 = 0x08;

pub const COMMON_HEADER_BYTES: usize = 8;
pub const IC_PDU_BYTES: usize = 128;
pub const SQE_BYTES: usize = 64;
pub const CQE_BYTES: usize = 16;
pub const CAPSULE_CMD_HLEN: usize = COMMON_HEADER_BYTES + SQE_BYTES;
pub const CAPSULE_RESP_HLEN: usize = COMMON_HEADER_BYTES + CQE_BYTES;
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const TERM_REQ_HLEN: usize = 24;
pub const DIGEST_BYTES: usize = 4;
/// A TermReq carries at most the offending PDU header (the largest is 128 bytes).
pub const TERM_REQ_DATA_MAX: usize = 128;
/// The largest header (with digest) this codec decodes; a receive buffer holds it.
pub const HEADER_BYTES_MAX: usize = IC_PDU_BYTES + DIGEST_BYTES;
/// Fabrics Connect data is 1024 bytes.
pub const CONNECT_DATA_BYTES: usize = 1024;

/// ICReq/ICResp digest bits.
pub const IC_DGST_HEADER: u8 = 0x01;
pub const IC_DGST_DATA: u8 = 0x02;

// TermReq fatal error status (FES).
pub const FES_INVALID_HEADER_FIELD: u16 = 0x01;
pub const FES_PDU_SEQUENCE_ERROR: u16 = 0x02;
pub const FES_HEADER_DIGEST_ERROR: u16 = 0x03;
pub const FES_DATA_OUT_OF_RANGE: u16 = 0x04;
pub const FES_DATA_LIMIT_EXCEEDED: u16 = 0x05;
pub const FES_UNSUPPORTED_PARAMETER: u16 = 0x06;

// ---------------------------------------------------------------------------------------------
// NVMe opcodes, status codes, SGL types.
// ---------------------------------------------------------------------------------------------

pub const OPC_FABRICS: u8 = 0x7f;
pub const FCTYPE_PROPERTY_SET: u8 = 0x00;
pub const FCTYPE_CONNECT: u8 = 0x01;
pub const FCTYPE_PROPERTY_GET: u8 = 0x04;
pub const FCTYPE_DISCONNECT: u8 = 0x08;

pub const ADMIN_GET_LOG_PAGE: u8 = 0x02;
pub const ADMIN_IDENTIFY: u8 = 0x06;
pub const ADMIN_ABORT: u8 = 0x08;
pub const ADMIN_SET_FEATURES: u8 = 0x09;
pub const ADMIN_GET_FEATURES: u8 = 0x0a;
pub const ADMIN_ASYNC_EVENT: u8 = 0x0c;
pub const ADMIN_KEEP_ALIVE: u8 = 0x18;

pub const IO_FLUSH: u8 = 0x00;
pub const IO_WRITE: u8 = 0x01;
pub const IO_READ: u8 = 0x02;
pub const IO_WRITE_ZEROES: u8 = 0x08;
pub const IO_DSM: u8 = 0x09;

/// Status code type: generic.
pub const SCT_GENERIC: u8 = 0;
/// Status code type: command specific.
pub const SCT_CMD: u8 = 1;
/// Status code type: media and data integrity errors.
pub const SCT_MEDIA: u8 = 2;

pub const SC_SUCCESS: u8 = 0x00;
pub const SC_INVALID_OPCODE: u8 = 0x01;
pub const SC_INVALID_FIELD: u8 = 0x02;
pub const SC_DATA_TRANSFER_ERROR: u8 = 0x04;
pub const SC_INTERNAL: u8 = 0x06;
pub const SC_ABORT_REQUESTED: u8 = 0x07;
pub const SC_INVALID_NS: u8 = 0x0b;
pub const SC_CMD_SEQ_ERROR: u8 = 0x0c;
pub const SC_SGL_LENGTH_INVALID: u8 = 0x0f;
pub const SC_SGL_TYPE_INVALID: u8 = 0x11;
pub const SC_SGL_OFFSET_INVALID: u8 = 0x16;
pub const SC_LBA_RANGE: u8 = 0x80;
// Command specific (SCT 1).
pub const SC_INVALID_QID: u8 = 0x01;
pub const SC_AER_LIMIT: u8 = 0x05;
pub const SC_INVALID_LOG_PAGE: u8 = 0x09;
pub const SC_FEATURE_NOT_SAVEABLE: u8 = 0x0d;
pub const SC_CONNECT_FORMAT: u8 = 0x80;
pub const SC_CONNECT_CTRL_BUSY: u8 = 0x81;
pub const SC_CONNECT_INVALID_PARAM: u8 = 0x82;
pub const SC_CONNECT_INVALID_HOST: u8 = 0x84;
// Media (SCT 2).
pub const SC_WRITE_FAULT: u8 = 0x80;
pub const SC_UNRECOVERED_READ: u8 = 0x81;

/// The CQE status field (phase bit 0): SC in bits 8:1, SCT in 11:9, DNR in 15.
#[inline]
pub const fn status(sct: u8, sc: u8) -> u16 {
    let dnr = if sct == SCT_GENERIC && sc == SC_SUCCESS {
        0
    } else {
        1 << 15
    };
    ((sc as u16) << 1) | (((sct & 7) as u16) << 9) | dnr
}

pub const STATUS_SUCCESS: u16 = 0;

/// (SCT, SC) of a status field.
pub const fn status_parts(status: u16) -> (u8, u8) {
    (((status >> 9) & 7) as u8, (status >> 1) as u8)
}

/// SGL descriptor type byte (type << 4 | subtype): data block, offset address (in-capsule).
pub const SGL_DATA_BLOCK_OFFSET: u8 = 0x01;
/// SGL descriptor type byte: transport SGL data block, transport specific (host memory).
pub const SGL_TRANSPORT_DATA_BLOCK: u8 = 0x5a;

// Properties (Fabrics Property Get/Set offsets).
pub const PROP_CAP: u32 = 0x00;
pub const PROP_VS: u32 = 0x08;
pub const PROP_CC: u32 = 0x14;
pub const PROP_CSTS: u32 = 0x1c;

pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Connect CATTR bit: disable SQ flow control (C2HData may then carry SUCCESS).
pub const CATTR_DISABLE_SQ_FLOW: u8 = 0x04;

// ---------------------------------------------------------------------------------------------
// Little-endian helpers.
// ---------------------------------------------------------------------------------------------

#[inline]
pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
#[inline]
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
pub fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32
}
#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
#[inline]
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC32C as NVMe/TCP digests use it (the standard Castagnoli CRC, stored little-endian).
#[inline]
pub fn digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

// ---------------------------------------------------------------------------------------------
// SQE and CQE.
// ---------------------------------------------------------------------------------------------

/// A submission queue entry (64 bytes), decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub sgl_addr: u64,
    pub sgl_len: u32,
    pub sgl_type: u8,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Sqe {
    pub fn parse(b: &[u8; SQE_BYTES]) -> Sqe {
        Sqe {
            opcode: b[0],
            flags: b[1],
            cid: le16(b, 2),
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            sgl_addr: le64(b, 24),
            sgl_len: le32(b, 32),
            sgl_type: b[39],
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }

    pub fn encode(&self, b: &mut [u8; SQE_BYTES]) {
        *b = [0; SQE_BYTES];
        b[0] = self.opcode;
        b[1] = self.flags;
        put16(b, 2, self.cid);
        put32(b, 4, self.nsid);
        put32(b, 8, self.cdw2);
        put32(b, 12, self.cdw3);
        put64(b, 24, self.sgl_addr);
        put32(b, 32, self.sgl_len);
        b[39] = self.sgl_type;
        put32(b, 40, self.cdw10);
        put32(b, 44, self.cdw11);
        put32(b, 48, self.cdw12);
        put32(b, 52, self.cdw13);
        put32(b, 56, self.cdw14);
        put32(b, 60, self.cdw15);
    }

    /// The Fabrics command type (byte 4) of a Fabrics command.
    pub fn fctype(&self) -> u8 {
        self.nsid as u8
    }

    /// Starting LBA of a Read/Write/Write Zeroes.
    pub fn slba(&self) -> u64 {
        self.cdw10 as u64 | (self.cdw11 as u64) << 32
    }

    /// Number of logical blocks (cdw12 bits 15:0 are 0-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }

    pub fn fua(&self) -> bool {
        self.cdw12 & (1 << 30) != 0
    }
}

/// A completion queue entry (16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: u16,
}

impl Cqe {
    pub fn parse(b: &[u8]) -> Cqe {
        Cqe {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: le16(b, 14),
        }
    }

    pub fn encode(&self, b: &mut [u8]) {
        put32(b, 0, self.dw0);
        put32(b, 4, self.dw1);
        put16(b, 8, self.sqhd);
        put16(b, 10, self.sqid);
        put16(b, 12, self.cid);
        put16(b, 14, self.status);
    }
}

/// Fabrics Connect data (1024 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// An NQN field: UTF-8 up to the first NUL, at most 256 bytes (223 meaningful).
fn nqn_field(b: &[u8]) -> Result<String, &'static str> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(|s| s.to_string())
        .map_err(|_| "NQN is not UTF-8")
}

impl ConnectData {
    pub fn parse(b: &[u8]) -> Result<ConnectData, &'static str> {
        if b.len() < CONNECT_DATA_BYTES {
            return Err("Connect data shorter than 1024 bytes");
        }
        let mut hostid = [0; 16];
        hostid.copy_from_slice(&b[..16]);
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn: nqn_field(&b[256..512])?,
            hostnqn: nqn_field(&b[512..768])?,
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[..CONNECT_DATA_BYTES].fill(0);
        b[..16].copy_from_slice(&self.hostid);
        put16(b, 16, self.cntlid);
        let s = self.subnqn.as_bytes();
        b[256..256 + s.len().min(255)].copy_from_slice(&s[..s.len().min(255)]);
        let h = self.hostnqn.as_bytes();
        b[512..512 + h.len().min(255)].copy_from_slice(&h[..h.len().min(255)]);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding.
// ---------------------------------------------------------------------------------------------

/// Which side decodes: the target accepts host-to-controller PDUs, the host the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Target,
    Host,
}

/// Negotiated digests. Before ICReq/ICResp completes both are off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Largest data each PDU kind may carry, as negotiated or advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// In-capsule data of a CapsuleCmd (IOCCSZ * 16 - 64 on I/O queues).
    pub in_capsule_data_max: u32,
    /// Data of one H2CData PDU (MAXH2CDATA) or one C2HData PDU.
    pub data_pdu_max: u32,
}

/// ICReq fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    pub hpda: u8,
    pub digests: Digests,
    pub maxr2t: u32,
}

/// ICResp fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    pub cpda: u8,
    pub digests: Digests,
    pub maxh2cdata: u32,
}

/// H2CData / C2HData header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHdr {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
}

/// R2T fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// TermReq fields (the offending header bytes are the PDU's data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// A decoded PDU header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Sqe),
    CapsuleResp(Cqe),
    H2CData(DataHdr),
    C2HData(DataHdr),
    R2T(R2t),
}

/// Where the parts of one PDU lie, counted from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduHead {
    pub pdu: Pdu,
    pub flags: u8,
    /// Bytes before the data (header, header digest, padding): data starts here.
    pub data_offset: u32,
    pub data_bytes: u32,
    /// Whether a 4-byte data digest follows the data.
    pub data_digest: bool,
    /// PLEN: the whole PDU.
    pub total_bytes: u32,
}

/// Why a PDU was refused; maps to a TermReq (FES and FEI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduError {
    /// The PDU type is unknown or not one this side may receive.
    BadType { pdu_type: u8 },
    /// HLEN is wrong for the type.
    BadHlen { pdu_type: u8, hlen: u8, want: u8 },
    /// The HDGSTF/DDGSTF flags disagree with the negotiated digests.
    BadDigestFlags { pdu_type: u8, flags: u8 },
    /// PDO points outside the PDU or before the end of the header.
    BadPdo { pdu_type: u8, pdo: u8 },
    /// PLEN is inconsistent with HLEN, PDO and digests.
    BadPlen { pdu_type: u8, plen: u32 },
    /// The PDU carries more data than the limit for its kind.
    DataTooLarge { pdu_type: u8, bytes: u64, max: u32 },
    /// The header digest does not match.
    HeaderDigest { pdu_type: u8, got: u32, want: u32 },
    /// A field value is invalid (FEI = its byte offset).
    BadField {
        pdu_type: u8,
        offset: u32,
        what: &'static str,
    },
    /// ICReq/ICResp with a protocol format version other than 0.
    BadPfv { pfv: u16 },
}

impl PduError {
    /// TermReq fatal error status.
    pub fn fes(&self) -> u16 {
        match self {
            PduError::HeaderDigest { .. } => FES_HEADER_DIGEST_ERROR,
            PduError::DataTooLarge { .. } => FES_DATA_LIMIT_EXCEEDED,
            PduError::BadPfv { .. } => FES_UNSUPPORTED_PARAMETER,
            _ => FES_INVALID_HEADER_FIELD,
        }
    }

    /// TermReq fatal error information: byte offset of the bad field.
    pub fn fei(&self) -> u32 {
        match *self {
            PduError::BadType { .. } => 0,
            PduError::BadDigestFlags { .. } => 1,
            PduError::BadHlen { .. } => 2,
            PduError::BadPdo { .. } => 3,
            PduError::BadPlen { .. } | PduError::DataTooLarge { .. } => 4,
            PduError::BadField { offset, .. } => offset,
            PduError::BadPfv { .. } => 8,
            PduError::HeaderDigest { .. } => 0,
        }
    }
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PduError::BadType { pdu_type } => {
                write!(f, "PDU type {pdu_type:#04x} is not valid here")
            }
            PduError::BadHlen {
                pdu_type,
                hlen,
                want,
            } => write!(f, "PDU type {pdu_type:#04x}: HLEN {hlen}, expected {want}"),
            PduError::BadDigestFlags { pdu_type, flags } => write!(
                f,
                "PDU type {pdu_type:#04x}: digest flags {flags:#04x} disagree with the negotiated digests"
            ),
            PduError::BadPdo { pdu_type, pdo } => {
                write!(f, "PDU type {pdu_type:#04x}: PDO {pdo} is out of place")
            }
            PduError::BadPlen { pdu_type, plen } => {
                write!(f, "PDU type {pdu_type:#04x}: PLEN {plen} is inconsistent")
            }
            PduError::DataTooLarge {
                pdu_type,
                bytes,
                max,
            } => write!(
                f,
                "PDU type {pdu_type:#04x}: {bytes} data bytes exceed the limit of {max}"
            ),
            PduError::HeaderDigest {
                pdu_type,
                got,
                want,
            } => write!(
                f,
                "PDU type {pdu_type:#04x}: header digest {got:#010x}, computed {want:#010x}"
            ),
            PduError::BadField {
                pdu_type,
                offset,
                what,
            } => write!(f, "PDU type {pdu_type:#04x}: byte {offset}: {what}"),
            PduError::BadPfv { pfv } => write!(f, "ICReq PFV {pfv} is not 0"),
        }
    }
}

impl std::error::Error for PduError {}

/// Expected HLEN per type, and whether the type may carry data.
fn shape(pdu_type: u8) -> Option<(usize, bool)> {
    Some(match pdu_type {
        PDU_ICREQ | PDU_ICRESP => (IC_PDU_BYTES, false),
        PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ => (TERM_REQ_HLEN, true),
        PDU_CAPSULE_CMD => (CAPSULE_CMD_HLEN, true),
        PDU_CAPSULE_RESP => (CAPSULE_RESP_HLEN, false),
        PDU_H2C_DATA | PDU_C2H_DATA => (DATA_HLEN, true),
        PDU_R2T => (R2T_HLEN, false),
        _ => return None,
    })
}

/// Decodes the PDU starting at `buf[0]`. `Ok(None)`: fewer bytes than its header
/// (and header digest) are buffered. The data itself need not be buffered; the
/// caller takes `data_bytes` at `data_offset` and checks the data digest with
/// [`digest`]. Errors say which field is wrong; the connection then sends a
/// TermReq and closes.
pub fn decode(
    buf: &[u8],
    role: Role,
    digests: Digests,
    limits: &Limits,
) -> Result<Option<PduHead>, PduError> {
    if buf.len() < COMMON_HEADER_BYTES {
        return Ok(None);
    }
    let (pdu_type, flags, hlen, pdo, plen) = (buf[0], buf[1], buf[2], buf[3], le32(buf, 4));
    let allowed = match role {
        Role::Target => matches!(
            pdu_type,
            PDU_ICREQ | PDU_H2C_TERM_REQ | PDU_CAPSULE_CMD | PDU_H2C_DATA
        ),
        Role::Host => matches!(
            pdu_type,
            PDU_ICRESP | PDU_C2H_TERM_REQ | PDU_CAPSULE_RESP | PDU_C2H_DATA | PDU_R2T
        ),
    };
    let Some((want_hlen, may_carry_data)) = shape(pdu_type).filter(|_| allowed) else {
        return Err(PduError::BadType { pdu_type });
    };
    if hlen as usize != want_hlen {
        return Err(PduError::BadHlen {
            pdu_type,
            hlen,
            want: want_hlen as u8,
        });
    }
    let plain = matches!(
        pdu_type,
        PDU_ICREQ | PDU_ICRESP | PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ
    );
    let hd = if !plain && digests.header {
        DIGEST_BYTES
    } else {
        0
    };
    if (flags & FLAG_HDGST != 0) != (hd != 0) {
        return Err(PduError::BadDigestFlags { pdu_type, flags });
    }
    let header_end = want_hlen + hd;
    let plen_us = plen as usize;
    if plen_us < header_end {
        return Err(PduError::BadPlen { pdu_type, plen });
    }
    let has_data = plen_us > header_end;
    if has_data && !may_carry_data {
        return Err(PduError::BadPlen { pdu_type, plen });
    }
    let dd = !plain && has_data && digests.data;
    if !plain && (flags & FLAG_DDGST != 0) != dd {
        return Err(PduError::BadDigestFlags { pdu_type, flags });
    }
    let dd_bytes = if dd { DIGEST_BYTES } else { 0 };
    let (data_offset, data_bytes) = if has_data {
        let pdo = pdo as usize;
        if plain && pdo == 0 {
            // TermReq data follows the header directly; PDO is reserved there.
            (header_end, plen_us - header_end)
        } else {
            if pdo < header_end || pdo % 4 != 0 || pdo + dd_bytes >= plen_us {
                return Err(PduError::BadPdo {
                    pdu_type,
                    pdo: pdo as u8,
                });
            }
            (pdo, plen_us - pdo - dd_bytes)
        }
    } else {
        if pdo != 0 && pdo as usize != header_end {
            return Err(PduError::BadPdo { pdu_type, pdo });
        }
        (plen_us, 0)
    };
    let max = match pdu_type {
        PDU_CAPSULE_CMD => limits.in_capsule_data_max,
        PDU_H2C_DATA | PDU_C2H_DATA => limits.data_pdu_max,
        PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ => TERM_REQ_DATA_MAX as u32,
        _ => 0,
    };
    if data_bytes > max as usize {
        return Err(PduError::DataTooLarge {
            pdu_type,
            bytes: data_bytes as u64,
            max,
        });
    }
    if buf.len() < header_end {
        return Ok(None);
    }
    if hd != 0 {
        let got = le32(buf, want_hlen);
        let want = digest(&buf[..want_hlen]);
        if got != want {
            return Err(PduError::HeaderDigest {
                pdu_type,
                got,
                want,
            });
        }
    }
    let h = &buf[..want_hlen];
    let field = |offset: u32, what: &'static str| PduError::BadField {
        pdu_type,
        offset,
        what,
    };
    let pdu = match pdu_type {
        PDU_ICREQ | PDU_ICRESP => {
            if plen_us != IC_PDU_BYTES {
                return Err(PduError::BadPlen { pdu_type, plen });
            }
            let pfv = le16(h, 8);
            if pfv != 0 {
                return Err(PduError::BadPfv { pfv });
            }
            let d = Digests {
                header: h[11] & IC_DGST_HEADER != 0,
                data: h[11] & IC_DGST_DATA != 0,
            };
            if h[11] & !(IC_DGST_HEADER | IC_DGST_DATA) != 0 {
                return Err(field(11, "reserved digest bits set"));
            }
            if pdu_type == PDU_ICREQ {
                if h[10] > 31 {
                    return Err(field(10, "HPDA above 31"));
                }
                Pdu::IcReq(IcReq {
                    pfv,
                    hpda: h[10],
                    digests: d,
                    maxr2t: le32(h, 12),
                })
            } else {
                if h[10] > 31 {
                    return Err(field(10, "CPDA above 31"));
                }
                let maxh2cdata = le32(h, 12);
                if maxh2cdata < 4096 || maxh2cdata % 4 != 0 {
                    return Err(field(12, "MAXH2CDATA below 4096 or not a multiple of 4"));
                }
                Pdu::IcResp(IcResp {
                    pfv,
                    cpda: h[10],
                    digests: d,
                    maxh2cdata,
                })
            }
        }
        PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ => {
            let t = TermReq {
                fes: le16(h, 8),
                fei: le32(h, 10),
            };
            if pdu_type == PDU_H2C_TERM_REQ {
                Pdu::H2CTermReq(t)
            } else {
                Pdu::C2HTermReq(t)
            }
        }
        PDU_CAPSULE_CMD => {
            let sqe: &[u8; SQE_BYTES] = h[8..72].try_into().expect("64 bytes");
            Pdu::CapsuleCmd(Sqe::parse(sqe))
        }
        PDU_CAPSULE_RESP => Pdu::CapsuleResp(Cqe::parse(&h[8..24])),
        PDU_H2C_DATA | PDU_C2H_DATA => {
            let d = DataHdr {
                cccid: le16(h, 8),
                ttag: le16(h, 10),
                datao: le32(h, 12),
                datal: le32(h, 16),
            };
            if d.datal as usize != data_bytes {
                return Err(field(16, "DATAL differs from the data in the PDU"));
            }
            if d.datal == 0 {
                return Err(field(16, "DATAL is zero"));
            }
            if d.datao.checked_add(d.datal).is_none() {
                return Err(field(12, "DATAO + DATAL overflows"));
            }
            if pdu_type == PDU_H2C_DATA {
                if flags & FLAG_DATA_SUCCESS != 0 {
                    return Err(field(1, "SUCCESS flag on H2CData"));
                }
                Pdu::H2CData(d)
            } else {
                if flags & FLAG_DATA_SUCCESS != 0 && flags & FLAG_DATA_LAST == 0 {
                    return Err(field(1, "SUCCESS without LAST_PDU"));
                }
                Pdu::C2HData(d)
            }
        }
        PDU_R2T => {
            let r = R2t {
                cccid: le16(h, 8),
                ttag: le16(h, 10),
                r2to: le32(h, 12),
                r2tl: le32(h, 16),
            };
            if r.r2tl == 0 {
                return Err(field(16, "R2TL is zero"));
            }
            Pdu::R2T(r)
        }
        _ => unreachable!("shape() accepted only known types"),
    };
    Ok(Some(PduHead {
        pdu,
        flags,
        data_offset: data_offset as u32,
        data_bytes: data_bytes as u32,
        data_digest: dd,
        total_bytes: plen,
    }))
}

// ---------------------------------------------------------------------------------------------
// Encoding. Each function writes a complete header (and header digest) and
// returns its length; the caller sends data and the data digest after it.
// ---------------------------------------------------------------------------------------------

fn common(b: &mut [u8], pdu_type: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) {
    b[0] = pdu_type;
    b[1] = flags;
    b[2] = hlen as u8;
    b[3] = pdo as u8;
    put32(b, 4, plen as u32);
}

fn finish_header(b: &mut [u8], hlen: usize, d: Digests) -> usize {
    if d.header {
        let crc = digest(&b[..hlen]);
        put32(b, hlen, crc);
        hlen + DIGEST_BYTES
    } else {
        hlen
    }
}

fn ic_dgst(d: Digests) -> u8 {
    (if d.header { IC_DGST_HEADER } else { 0 }) | (if d.data { IC_DGST_DATA } else { 0 })
}

/// ICReq (128 bytes, no digests).
pub fn encode_icreq(b: &mut [u8], hpda: u8, digests: Digests, maxr2t: u32) -> usize {
    b[..IC_PDU_BYTES].fill(0);
    common(b, PDU_ICREQ, 0, IC_PDU_BYTES, 0, IC_PDU_BYTES);
    b[10] = hpda;
    b[11] = ic_dgst(digests);
    put32(b, 12, maxr2t);
    IC_PDU_BYTES
}

/// ICResp (128 bytes): PFV 0, the CPDA, the digests accepted, MAXH2CDATA.
pub fn encode_icresp(b: &mut [u8], cpda: u8, digests: Digests, maxh2cdata: u32) -> usize {
    b[..IC_PDU_BYTES].fill(0);
    common(b, PDU_ICRESP, 0, IC_PDU_BYTES, 0, IC_PDU_BYTES);
    b[10] = cpda;
    b[11] = ic_dgst(digests);
    put32(b, 12, maxh2cdata);
    IC_PDU_BYTES
}

fn data_flags(d: Digests, data_bytes: usize) -> u8 {
    (if d.header { FLAG_HDGST } else { 0 })
        | (if d.data && data_bytes > 0 {
            FLAG_DDGST
        } else {
            0
        })
}

fn plen_with_data(header_end: usize, data_bytes: usize, d: Digests) -> (usize, usize) {
    if data_bytes == 0 {
        (0, header_end)
    } else {
        let dd = if d.data { DIGEST_BYTES } else { 0 };
        (header_end, header_end + data_bytes + dd)
    }
}

/// CapsuleCmd header with `data_bytes` of in-capsule data to follow.
pub fn encode_capsule_cmd(b: &mut [u8], sqe: &Sqe, data_bytes: usize, d: Digests) -> usize {
    let header_end = CAPSULE_CMD_HLEN + if d.header { DIGEST_BYTES } else { 0 };
    let (pdo, plen) = plen_with_data(header_end, data_bytes, d);
    common(
        b,
        PDU_CAPSULE_CMD,
        data_flags(d, data_bytes),
        CAPSULE_CMD_HLEN,
        pdo,
        plen,
    );
    let sqe_bytes: &mut [u8; SQE_BYTES] = (&mut b[8..72]).try_into().expect("64 bytes");
    sqe.encode(sqe_bytes);
    finish_header(b, CAPSULE_CMD_HLEN, d)
}

/// CapsuleResp (24 bytes plus header digest).
pub fn encode_capsule_resp(b: &mut [u8], cqe: &Cqe, d: Digests) -> usize {
    let header_end = CAPSULE_RESP_HLEN + if d.header { DIGEST_BYTES } else { 0 };
    common(
        b,
        PDU_CAPSULE_RESP,
        data_flags(d, 0),
        CAPSULE_RESP_HLEN,
        0,
        header_end,
    );
    cqe.encode(&mut b[8..24]);
    finish_header(b, CAPSULE_RESP_HLEN, d)
}

/// H2CData or C2HData header; `extra_flags` is LAST_PDU and/or SUCCESS.
/// `pad` bytes of zeros are placed between the header and the data (host HPDA).
#[allow(clippy::too_many_arguments)]
pub fn encode_data_hdr(
    b: &mut [u8],
    pdu_type: u8,
    extra_flags: u8,
    hdr: &DataHdr,
    pad: usize,
    d: Digests,
) -> usize {
    debug_assert!(hdr.datal > 0);
    let header_end = DATA_HLEN + if d.header { DIGEST_BYTES } else { 0 };
    let pdo = header_end + pad;
    let dd = if d.data { DIGEST_BYTES } else { 0 };
    let plen = pdo + hdr.datal as usize + dd;
    common(
        b,
        pdu_type,
        data_flags(d, hdr.datal as usize) | extra_flags,
        DATA_HLEN,
        pdo,
        plen,
    );
    put16(b, 8, hdr.cccid);
    put16(b, 10, hdr.ttag);
    put32(b, 12, hdr.datao);
    put32(b, 16, hdr.datal);
    put32(b, 20, 0);
    let n = finish_header(b, DATA_HLEN, d);
    b[n..n + pad].fill(0);
    n + pad
}

/// R2T (24 bytes plus header digest).
pub fn encode_r2t(b: &mut [u8], r: &R2t, d: Digests) -> usize {
    let header_end = R2T_HLEN + if d.header { DIGEST_BYTES } else { 0 };
    common(b, PDU_R2T, data_flags(d, 0), R2T_HLEN, 0, header_end);
    put16(b, 8, r.cccid);
    put16(b, 10, r.ttag);
    put32(b, 12, r.r2to);
    put32(b, 16, r.r2tl);
    put32(b, 20, 0);
    finish_header(b, R2T_HLEN, d)
}

/// TermReq carrying (up to 128 bytes of) the offending PDU header. Returns the
/// whole PDU's length; `b` must hold 24 + 128 bytes.
pub fn encode_term_req(b: &mut [u8], pdu_type: u8, t: &TermReq, offending: &[u8]) -> usize {
    let n = offending.len().min(TERM_REQ_DATA_MAX);
    let plen = TERM_REQ_HLEN + n;
    b[..TERM_REQ_HLEN].fill(0);
    common(b, pdu_type, 0, TERM_REQ_HLEN, 0, plen);
    put16(b, 8, t.fes);
    put32(b, 10, t.fei);
    b[TERM_REQ_HLEN..plen].copy_from_slice(&offending[..n]);
    plen
}

/// Padding before C2HData payload so that PDO is a multiple of (HPDA + 1) * 4.
pub fn hpda_pad(header_end: usize, hpda: u8) -> usize {
    let align = (hpda as usize + 1) * 4;
    header_end.next_multiple_of(align) - header_end
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        in_capsule_data_max: 8192,
        data_pdu_max: 1 << 20,
    };
    const ON: Digests = Digests {
        header: true,
        data: true,
    };
    const OFF: Digests = Digests {
        header: false,
        data: false,
    };

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(digest(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn icreq_round_trip_and_pfv() {
        let mut b = [0u8; 128];
        encode_icreq(&mut b, 0, ON, 0);
        let h = decode(&b, Role::Target, OFF, &LIM).unwrap().unwrap();
        assert_eq!(
            h.pdu,
            Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests: ON,
                maxr2t: 0
            })
        );
        assert_eq!(h.total_bytes, 128);
        b[8] = 1;
        assert_eq!(
            decode(&b, Role::Target, OFF, &LIM).unwrap_err(),
            PduError::BadPfv { pfv: 1 }
        );
        // The host may not send ICResp.
        encode_icresp(&mut b, 0, ON, 4096);
        assert_eq!(decode(&b, Role::Target, OFF, &LIM).unwrap_err().fei(), 0);
        let r = decode(&b, Role::Host, OFF, &LIM).unwrap().unwrap();
        assert!(matches!(
            r.pdu,
            Pdu::IcResp(IcResp {
                maxh2cdata: 4096,
                ..
            })
        ));
    }

    #[test]
    fn capsule_with_in_capsule_data_and_digests() {
        for d in [OFF, ON] {
            let sqe = Sqe {
                opcode: IO_WRITE,
                cid: 7,
                nsid: 1,
                sgl_len: 4096,
                sgl_type: SGL_DATA_BLOCK_OFFSET,
                cdw12: 7,
                ..Default::default()
            };
            let mut b = vec![0u8; 128 + 4096 + 4];
            let n = encode_capsule_cmd(&mut b, &sqe, 4096, d);
            assert_eq!(n, 72 + if d.header { 4 } else { 0 });
            // Byte-at-a-time: header incomplete until the digest arrived.
            for cut in 0..n {
                assert_eq!(
                    decode(&b[..cut], Role::Target, d, &LIM),
                    Ok(None),
                    "cut {cut}"
                );
            }
            let h = decode(&b[..n], Role::Target, d, &LIM).unwrap().unwrap();
            assert_eq!(h.pdu, Pdu::CapsuleCmd(sqe));
            assert_eq!(h.data_offset as usize, n);
            assert_eq!(h.data_bytes, 4096);
            assert_eq!(h.data_digest, d.data);
            assert_eq!(
                h.total_bytes as usize,
                n + 4096 + if d.data { 4 } else { 0 }
            );
            assert_eq!(Sqe::parse(b[8..72].try_into().unwrap()).nlb(), 8);
        }
    }

    #[test]
    fn malformed_headers_are_refused_precisely() {
        let sqe = Sqe::default();
        let mut b = [0u8; 256];
        encode_capsule_cmd(&mut b, &sqe, 0, OFF);
        let err = |b: &[u8], d: Digests| decode(b, Role::Target, d, &LIM).unwrap_err();
        // Bad type.
        let mut x = b;
        x[0] = 0x42;
        assert_eq!(err(&x, OFF), PduError::BadType { pdu_type: 0x42 });
        // A C2H type sent to the target.
        x[0] = PDU_C2H_DATA;
        assert_eq!(err(&x, OFF).fes(), FES_INVALID_HEADER_FIELD);
        // Bad HLEN.
        let mut x = b;
        x[2] = 71;
        assert_eq!(err(&x, OFF).fei(), 2);
        // Oversized in-capsule data.
        let mut x = b;
        put32(&mut x, 4, 72 + 8196);
        x[3] = 72;
        let e = err(&x, OFF);
        assert_eq!(e.fes(), FES_DATA_LIMIT_EXCEEDED);
        assert!(
            e.to_string()
                .contains("8196 data bytes exceed the limit of 8192"),
            "{e}"
        );
        // PLEN shorter than the header.
        let mut x = b;
        put32(&mut x, 4, 10);
        assert!(matches!(err(&x, OFF), PduError::BadPlen { plen: 10, .. }));
        // Digest flag without negotiated digest, and a corrupt header digest.
        let mut x = b;
        x[1] = FLAG_HDGST;
        assert!(matches!(err(&x, OFF), PduError::BadDigestFlags { .. }));
        let mut y = [0u8; 256];
        encode_capsule_cmd(&mut y, &sqe, 0, ON);
        y[20] ^= 1;
        assert_eq!(err(&y, ON).fes(), FES_HEADER_DIGEST_ERROR);
    }

    #[test]
    fn data_pdus_and_r2t() {
        let mut b = [0u8; 64];
        let hdr = DataHdr {
            cccid: 3,
            ttag: 9,
            datao: 4096,
            datal: 8192,
        };
        let n = encode_data_hdr(&mut b, PDU_C2H_DATA, FLAG_DATA_LAST, &hdr, 0, ON);
        let h = decode(&b[..n], Role::Host, ON, &LIM).unwrap().unwrap();
        assert_eq!(h.pdu, Pdu::C2HData(hdr));
        assert_eq!(h.flags & FLAG_DATA_LAST, FLAG_DATA_LAST);
        assert_eq!(h.total_bytes as usize, n + 8192 + 4);
        // HPDA padding keeps PDO aligned.
        let n = encode_data_hdr(&mut b, PDU_C2H_DATA, 0, &hdr, hpda_pad(28, 1), ON);
        assert_eq!(n, 32);
        assert_eq!(
            decode(&b, Role::Host, ON, &LIM)
                .unwrap()
                .unwrap()
                .data_offset,
            32
        );
        let n = encode_r2t(
            &mut b,
            &R2t {
                cccid: 1,
                ttag: 2,
                r2to: 0,
                r2tl: 65536,
            },
            OFF,
        );
        assert_eq!(n, 24);
        assert!(matches!(
            decode(&b[..n], Role::Host, OFF, &LIM).unwrap().unwrap().pdu,
            Pdu::R2T(R2t { r2tl: 65536, .. })
        ));
        // H2CData whose DATAL disagrees with PLEN.
        let mut hd = hdr;
        let n = encode_data_hdr(&mut b, PDU_H2C_DATA, 0, &hd, 0, OFF);
        put32(&mut b, 16, 100);
        assert_eq!(
            decode(&b[..n], Role::Target, OFF, &LIM).unwrap_err().fei(),
            16
        );
        hd.datal = 2 << 20;
        let n = encode_data_hdr(&mut b, PDU_H2C_DATA, 0, &hd, 0, OFF);
        assert_eq!(
            decode(&b[..n], Role::Target, OFF, &LIM).unwrap_err().fes(),
            FES_DATA_LIMIT_EXCEEDED
        );
    }

    #[test]
    fn term_req_and_connect_data() {
        let mut b = [0u8; 152];
        let n = encode_term_req(
            &mut b,
            PDU_C2H_TERM_REQ,
            &TermReq { fes: 1, fei: 2 },
            &[0xaa; 200],
        );
        assert_eq!(n, 152);
        let h = decode(&b, Role::Host, ON, &LIM).unwrap().unwrap();
        assert_eq!(h.pdu, Pdu::C2HTermReq(TermReq { fes: 1, fei: 2 }));
        assert_eq!((h.data_offset, h.data_bytes), (24, 128));
        let c = ConnectData {
            hostid: [5; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2024-01.io.kiln:vol0".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let mut d = [0u8; 1024];
        c.encode(&mut d);
        assert_eq!(ConnectData::parse(&d).unwrap(), c);
    }

    #[test]
    fn status_field_layout() {
        // Connect Invalid Host: SCT 1, SC 0x84, DNR.
        let s = status(SCT_CMD, SC_CONNECT_INVALID_HOST);
        assert_eq!(s, 0x8000 | (1 << 9) | (0x84 << 1));
        assert_eq!(status_parts(s), (1, 0x84));
        assert_eq!(status(SCT_GENERIC, SC_SUCCESS), 0);
    }
}
