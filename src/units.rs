//! Human sizes: `4GiB`, `512M`, `1g`, `4096`.
//!
//! Binary multiples everywhere: `K`, `KB` and `KiB` all mean 1024, because
//! storage users type `1G` and mean what `fio` and `qemu-img` mean by it.

/// Parses a size such as `4GiB`, `512M` or `4096` into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty size".to_string());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!("size '{text}' does not start with a number"));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("size '{text}' is too large"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        other => {
            return Err(format!(
                "size '{text}' has unknown unit '{other}' (use B, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    value
        .checked_shl(shift)
        .filter(|v| v >> shift == value)
        .ok_or_else(|| format!("size '{text}' overflows 64 bits"))
}

/// Formats bytes the way [`parse_size`] reads them, exact when possible.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ];
    for (name, shift) in UNITS {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{}", bytes >> shift, name);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12x").unwrap_err().contains("unknown unit"));
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999PiB")
            .unwrap_err()
            .contains("overflows"));
        assert_eq!(format_size(4 << 30), "4GiB");
        assert_eq!(format_size(1536), "1536B");
    }
}
