//! The logger's rate limit, in a process of its own: the logger is global,
//! and any other test that logs (the console's drop warnings do) would take
//! from the same burst and put its lines in the same file.

use log::LevelFilter;
use moat_vmm::logger;

#[test]
fn a_flood_is_cut_to_the_burst_and_the_rest_is_counted() {
    let path = std::env::temp_dir().join(format!("moat-log-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    logger::init(
        "test-vm",
        &logger::LogOptions {
            path: Some(path.clone()),
            level: Some(LevelFilter::Info),
            show_level: true,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..1000 {
        log::warn!("flood {i}");
    }
    std::thread::sleep(logger::REFILL * 2);
    log::warn!("after");
    log::logger().flush();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), logger::BURST as usize + 1, "{text}");
    assert!(lines[0].contains("[test-vm:") && lines[0].contains("WARN flood 0"));
    let last = lines.last().unwrap();
    assert!(
        last.contains("after")
            && last.contains(&format!("{} earlier messages", 1000 - logger::BURST)),
        "{last}"
    );
    let _ = std::fs::remove_file(&path);
}
