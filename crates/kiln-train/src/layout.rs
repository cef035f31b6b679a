//! `train.layout` (or `--layout`): how a run spreads over its ranks, in `kiln plan`'s syntax,
//! `dp=..,tp=..,pp=..,vpp=..,ep=..,zero=..,recompute=..,sp=..`. Every key is optional and sets
//! what it names: `tp` is `train.tp`, `pp` is `train.pp`, `vpp` is `train.vpp`, `ep` is
//! `train.ep`, `zero` is `train.zero`,
//! `recompute` (`none` or `full`) is `train.recompute`, `sp` (`on` or `off`) is
//! `train.sequence_parallel`; `dp`, when given, times tp times pp must
//! be the ranks of the launch. So the layout `kiln plan --layout` sizes is the one the run takes.

use crate::config::TrainSection;

/// A parsed `train.layout`: the keys it gave.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunLayout {
    pub dp: Option<usize>,
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    pub vpp: Option<usize>,
    pub ep: Option<usize>,
    pub zero: Option<u8>,
    pub recompute: Option<bool>,
    pub sequence_parallel: Option<bool>,
}

impl RunLayout {
    /// Parses `spec`; refuses unknown keys, sizes that are not positive whole numbers, ZeRO
    /// stages above 3 and `recompute=selective`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut layout = Self::default();
        let err = |why: String| format!("`train.layout` = \"{spec}\": {why}");
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| err(format!("`{part}` is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let size = || -> Result<usize, String> {
                match value.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(err(format!("`{key}` = `{value}` is not a positive whole number"))),
                }
            };
            match key {
                "dp" => layout.dp = Some(size()?),
                "ep" => layout.ep = Some(size()?),
                "tp" => layout.tp = Some(size()?),
                "pp" => layout.pp = Some(size()?),
                "vpp" => layout.vpp = Some(size()?),
                "zero" => match value.parse::<u8>() {
                    Ok(z) if z <= 3 => layout.zero = Some(z),
                    _ => return Err(err(format!("`zero` = `{value}`: ZeRO has stages 0 to 3"))),
                },
                "recompute" => match value {
                    "none" => layout.recompute = Some(false),
                    "full" => layout.recompute = Some(true),
                    _ => {
                        return Err(err(format!(
                            "`recompute` = `{value}`: kiln recomputes whole layers (`full`) or nothing (`none`)"
                        )))
                    }
                },
                "sp" => match value {
                    "on" => layout.sequence_parallel = Some(true),
                    "off" => layout.sequence_parallel = Some(false),
                    _ => return Err(err(format!("`sp` = `{value}`: sequence parallel is `on` or `off`"))),
                },
                other => return Err(err(format!("unknown key `{other}` (dp, tp, pp, vpp, ep, zero, recompute, sp)"))),
            }
        }
        Ok(layout)
    }

    /// Sets the keys the layout gave in `train`.
    pub fn apply(&self, train: &mut TrainSection) {
        if let Some(tp) = self.tp {
            train.tp = tp;
        }
        if let Some(pp) = self.pp {
            train.pp = pp;
        }
        if let Some(vpp) = self.vpp {
            train.vpp = vpp;
        }
        if let Some(ep) = self.ep {
            train.ep = ep;
        }
        if let Some(zero) = self.zero {
            train.zero = zero;
        }
        if let Some(recompute) = self.recompute {
            train.recompute = recompute;
        }
        if let Some(sequence_parallel) = self.sequence_parallel {
            train.sequence_parallel = sequence_parallel;
        }
    }

    /// Refuses a layout whose dp·tp·pp is not the launch's `ranks` (without `dp`, whose tp·pp
    /// does not divide them).
    pub fn check_ranks(&self, spec: &str, ranks: usize) -> Result<(), String> {
        let (tp, pp) = (self.tp.unwrap_or(1), self.pp.unwrap_or(1));
        let dp = self.dp.unwrap_or(ranks / (tp * pp));
        match dp * tp * pp == ranks {
            true => Ok(()),
            false if self.dp.is_none() => Err(format!(
                "`train.layout` = \"{spec}\": {} does not divide the {ranks} ranks of the launch (mpirun -np)",
                model_parallel(tp, pp)
            )),
            false => Err(format!(
                "`train.layout` = \"{spec}\": dp·tp·pp = {dp}·{tp}·{pp} = {} does not equal the {ranks} ranks of the launch (mpirun -np)",
                dp * tp * pp
            )),
        }
    }
}

/// The model-parallel sizes, named: `tp = 2`, `pp = 4`, or `tp·pp = 2·4`.
pub fn model_parallel(tp: usize, pp: usize) -> String {
    match (tp, pp) {
        (tp, 1) => format!("tp = {tp}"),
        (1, pp) => format!("pp = {pp}"),
        (tp, pp) => format!("tp·pp = {tp}·{pp}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_set_what_they_name_and_the_rest_is_left() {
        let l = RunLayout::parse("dp=4, ep=2,zero=3,recompute=full,tp=1,pp=1,vpp=1").unwrap();
        assert_eq!(
            l,
            RunLayout {
                dp: Some(4),
                tp: Some(1),
                pp: Some(1),
                vpp: Some(1),
                ep: Some(2),
                zero: Some(3),
                recompute: Some(true),
                sequence_parallel: None
            }
        );
        assert_eq!(RunLayout::parse("tp=2,sp=off").unwrap().sequence_parallel, Some(false));
        assert_eq!(RunLayout::parse("pp=2,vpp=3").unwrap().vpp, Some(3));
        assert_eq!(RunLayout::parse("").unwrap(), RunLayout::default());
        assert!(l.check_ranks("dp=4", 4).is_ok());
        assert!(l.check_ranks("dp=4", 2).unwrap_err().contains("does not equal the 2 ranks"));
        let tp = RunLayout::parse("dp=2,tp=2").unwrap();
        assert!(tp.check_ranks("dp=2,tp=2", 4).is_ok());
        assert!(tp.check_ranks("dp=2,tp=2", 2).unwrap_err().contains("2·2·1 = 4 does not equal the 2 ranks"));
        assert!(RunLayout::parse("tp=4")
            .unwrap()
            .check_ranks("tp=4", 6)
            .unwrap_err()
            .contains("does not divide the 6"));
        let pp = RunLayout::parse("dp=2,tp=2,pp=2").unwrap();
        assert!(pp.check_ranks("dp=2,tp=2,pp=2", 8).is_ok());
        assert!(pp.check_ranks("", 4).unwrap_err().contains("2·2·2 = 8 does not equal the 4 ranks"));
        assert!(RunLayout::parse("pp=4")
            .unwrap()
            .check_ranks("pp=4", 6)
            .unwrap_err()
            .contains("pp = 4 does not divide the 6"));
    }

    #[test]
    fn refusals_say_why() {
        for (spec, why) in [
            ("pp=0", "not a positive whole number"),
            ("zero=4", "stages 0 to 3"),
            ("dp=0", "not a positive whole number"),
            ("recompute=selective", "whole layers"),
            ("sp=yes", "`on` or `off`"),
            ("dp", "not key=value"),
        ] {
            let e = RunLayout::parse(spec).unwrap_err();
            assert!(e.contains(why) && e.contains(spec), "{spec}: {e}");
        }
    }
}
