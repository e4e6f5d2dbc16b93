//! Kubernetes resource quantities ("4", "3500m", "2.5", "1Ki", "1e3") read as
//! milli-units, as apimachinery's `Quantity.MilliValue` does: rounded up, never
//! negative here (a Node's allocatable CPU cannot be). Pure.
//!
//! Written here because the maintained parser, `kube_quantity` 0.9, has no
//! milli conversion: its integer conversions (`to_bytes_i64` …) refuse a value
//! with a negative scale such as `3500m`, the usual way a Node's allocatable
//! CPU is written, and none rounds up as `MilliValue` does.

/// `text` in thousandths, rounded up; `None` when it is not a quantity.
/// Saturates at `u64::MAX`; a negative quantity reads as 0.
pub fn milli_value(text: &str) -> Option<u64> {
    let text = text.trim();
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let number_end = unsigned.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return None;
    }
    let scale = suffix_scale(suffix)?;
    if negative {
        return Some(0);
    }
    let digits: String = whole.chars().chain(fraction.chars()).collect();
    // Leading zeros carry no value; more than 36 significant digits do not fit u128.
    let digits = digits.trim_start_matches('0');
    if digits.len() > 36 {
        return Some(u64::MAX);
    }
    let mantissa: u128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    let fraction_digits = i32::try_from(fraction.len()).ok()?;
    let milli = match scale {
        Scale::Decimal(exponent) => scaled(mantissa, exponent + 3 - fraction_digits, 1),
        Scale::Binary(power) => {
            let factor = 1u128.checked_shl(power).unwrap_or(u128::MAX);
            scaled(mantissa, 3 - fraction_digits, factor)
        }
    };
    Some(u64::try_from(milli).unwrap_or(u64::MAX))
}

enum Scale {
    /// × 10^n.
    Decimal(i32),
    /// × 2^n.
    Binary(u32),
}

/// The multiplier a suffix stands for (apimachinery `suffixer`).
fn suffix_scale(suffix: &str) -> Option<Scale> {
    let binary = |power| Some(Scale::Binary(power));
    match suffix {
        "" => Some(Scale::Decimal(0)),
        "n" => Some(Scale::Decimal(-9)),
        "u" => Some(Scale::Decimal(-6)),
        "m" => Some(Scale::Decimal(-3)),
        "k" => Some(Scale::Decimal(3)),
        "M" => Some(Scale::Decimal(6)),
        "G" => Some(Scale::Decimal(9)),
        "T" => Some(Scale::Decimal(12)),
        "P" => Some(Scale::Decimal(15)),
        "E" => Some(Scale::Decimal(18)),
        "Ki" => binary(10),
        "Mi" => binary(20),
        "Gi" => binary(30),
        "Ti" => binary(40),
        "Pi" => binary(50),
        "Ei" => binary(60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(Scale::Decimal(exponent.parse().ok()?))
        }
    }
}

/// `mantissa × factor × 10^exponent`, rounded up, saturating.
fn scaled(mantissa: u128, exponent: i32, factor: u128) -> u128 {
    let value = mantissa.saturating_mul(factor);
    if exponent >= 0 {
        let ten = 10u128.checked_pow(exponent.unsigned_abs()).unwrap_or(u128::MAX);
        if value == 0 { 0 } else { value.saturating_mul(ten) }
    } else {
        match 10u128.checked_pow(exponent.unsigned_abs()) {
            Some(divisor) => value.div_ceil(divisor),
            // Smaller than any representable unit, but not zero: rounds up to 1.
            None => u128::from(value > 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::milli_value;

    #[test]
    fn cpu_quantities_read_as_upstream_milli_values() {
        for (text, milli) in [
            ("4", 4000),
            ("3500m", 3500),
            ("2.5", 2500),
            ("0.1", 100),
            ("100n", 1),
            ("1k", 1_000_000),
            ("1Ki", 1_024_000),
            ("1e3", 1_000_000),
            ("1.5e-3", 2),
            ("0", 0),
            ("0m", 0),
            ("-1", 0),
            ("+2", 2000),
        ] {
            assert_eq!(milli_value(text), Some(milli), "{text}");
        }
    }

    #[test]
    fn text_that_is_no_quantity_is_refused() {
        for text in ["", "m", "1x", "1.2.3", "1e", "abc", "1 k"] {
            assert_eq!(milli_value(text), None, "{text}");
        }
    }
}
