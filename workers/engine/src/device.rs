//! Where the merge math runs.

use std::fmt;
use std::str::FromStr;

use crate::error::EngineError;

/// The device a port computes on: `cpu` (the fused CPU kernel, always built) or
/// `cuda:N` (candle's CUDA backend, only with the `cuda` cargo feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The fused in-place CPU kernel.
    #[default]
    Cpu,
    /// CUDA GPU number `N`.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = EngineError;

    /// Parses `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EngineError::BadDevice {
            input: s.chars().take(64).collect(),
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(bad)?;
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                n.parse().map(Device::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:+1", "CPU"] {
            assert!(bad.parse::<Device>().is_err(), "{bad:?}");
        }
    }
}
