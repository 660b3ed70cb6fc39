//! Every registry entry carries Table 3's resolutions: each cell of each
//! entry equals `recipes/table3.csv` (the paper's Table 3, transcribed), the
//! test crop is 0.95, and the registry and the table hold the same names.

use rsb_recipes::procedure::{table3, Procedure, RSB_TEST_CROP_PCT};
use rsb_vision::{find_model, registered_models};

#[test]
fn every_cell_matches_table_3() {
    let rows = table3().unwrap();
    let mut mismatches = Vec::new();
    for row in rows {
        let spec = find_model(&row.timm_name)
            .unwrap_or_else(|e| panic!("Table 3 row {} has no registry entry: {e}", row.timm_name));
        let cells = [
            ("A1/A2 train", spec.input_size, row.resolutions(Procedure::A2).0),
            ("A1/A2 test", spec.test_input_size, row.resolutions(Procedure::A2).1),
            ("A3 train", spec.a3_input_size, row.resolutions(Procedure::A3).0),
            ("A3 test", spec.a3_test_input_size, row.resolutions(Procedure::A3).1),
        ];
        for (column, registry, table) in cells {
            if registry != i64::from(table) {
                mismatches
                    .push(format!("{} {column}: registry {registry}, Table 3 {table}", spec.name));
            }
        }
        for (column, crop) in [("A1/A2 crop", spec.crop_pct), ("A3 crop", spec.a3_crop_pct)] {
            if crop != RSB_TEST_CROP_PCT {
                mismatches.push(format!("{} {column}: registry {crop}, Table 1 0.95", spec.name));
            }
        }
    }
    assert!(mismatches.is_empty(), "registry differs from Table 3:\n{}", mismatches.join("\n"));
}

#[test]
fn registry_and_table_hold_the_same_models() {
    let mut table: Vec<&str> = table3().unwrap().iter().map(|r| r.timm_name.as_str()).collect();
    let mut registry: Vec<&str> = registered_models().iter().map(|m| m.name).collect();
    assert_eq!(table.len(), 25, "Table 3 has 25 architectures");
    table.sort_unstable();
    registry.sort_unstable();
    let missing: Vec<&&str> = table.iter().filter(|n| !registry.contains(n)).collect();
    let extra: Vec<&&str> = registry.iter().filter(|n| !table.contains(n)).collect();
    assert!(missing.is_empty(), "Table 3 models without a registry entry: {missing:?}");
    assert!(extra.is_empty(), "registry entries not in Table 3: {extra:?}");
    assert_eq!(registry, table);
}
