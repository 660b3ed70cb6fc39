//! The element types the ring sums: f32, and bf16 carried as its 16 bits
//! (added in f32, each sum rounded back as libtorch rounds), and the code
//! of each in a collective's header.

/// An element type the ring sums: f32, or bf16 carried as its 16 bits.
pub(super) trait Element: bytemuck::Pod + Send + Sync {
    /// `self + other` in this type's arithmetic.
    fn add(self, other: Self) -> Self;
}

impl Element for f32 {
    fn add(self, other: f32) -> f32 {
        self + other
    }
}

/// A bf16 value: the upper 16 bits of an f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub(super) struct Bf16(pub(super) u16);

// SAFETY: a `repr(transparent)` wrapper of `u16`: any bit pattern is valid,
// no padding.
unsafe impl bytemuck::Zeroable for Bf16 {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for Bf16 {}

impl Bf16 {
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }

    /// Round to nearest even, NaN to the canonical quiet NaN: libtorch's
    /// `c10::BFloat16` conversion, bit for bit.
    pub(super) fn from_f32(value: f32) -> Bf16 {
        if value.is_nan() {
            return Bf16(0x7fc0);
        }
        let bits = value.to_bits();
        let bias = ((bits >> 16) & 1) + 0x7fff;
        Bf16((bits.wrapping_add(bias) >> 16) as u16)
    }
}

impl Element for Bf16 {
    fn add(self, other: Bf16) -> Bf16 {
        Bf16::from_f32(self.to_f32() + other.to_f32())
    }
}

/// What the header says about the elements: 0 for f32, 1 for bf16.
pub(super) fn element_code<T: Element>() -> u32 {
    if std::mem::size_of::<T>() == 2 {
        1
    } else {
        0
    }
}
