//! Flag parsing and input generation shared by the CUDA timing examples (`cuda_forward`,
//! `cuda_backward`); each includes this file with `#[path]`.

/// The command line after the program name, read as `--flag value` pairs.
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Self {
        Args(std::env::args().skip(1).collect())
    }

    /// Whether `flag` was given.
    #[allow(dead_code)] // cuda_backward does not ask
    pub fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }

    /// The comma-separated values after `flag`, or `default`'s.
    pub fn list(&self, flag: &str, default: &str) -> Result<Vec<String>, String> {
        let v = match self.0.iter().position(|a| a == flag) {
            Some(i) => self.0.get(i + 1).cloned().ok_or(format!("{flag} needs a value"))?,
            None => default.to_string(),
        };
        Ok(v.split(',').map(str::to_string).collect())
    }

    /// `list` parsed as numbers.
    pub fn nums(&self, flag: &str, default: &str) -> Result<Vec<u32>, String> {
        self.list(flag, default)?.iter().map(|s| s.parse::<u32>().map_err(|e| format!("{flag} {s}: {e}"))).collect()
    }

    /// The first number after `flag`, or `default`.
    pub fn one(&self, flag: &str, default: u32) -> Result<u32, String> {
        Ok(self.nums(flag, &default.to_string())?[0])
    }
}

/// `n` random values in [-1, 1) (never zeros) from a fixed-seed xorshift.
pub fn random_inputs(n: usize) -> Vec<f32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
