//! The SVG writer's tests: axis scaling, tick labels, escaping, and well-formed output.

use super::*;

#[test]
fn escapes_markup_and_control_characters() {
    assert_eq!(
        escape(r#"a<b & "c" > 'd'"#),
        "a&lt;b &amp; &quot;c&quot; &gt; &#39;d&#39;"
    );
    assert_eq!(escape("x\u{1}y"), "x?y");
    assert_eq!(escape("µs ±"), "µs ±");
}

#[test]
fn nice_steps() {
    assert_eq!(nice_step(10.0, 5), 2.0);
    assert_eq!(nice_step(1.0, 5), 0.2);
    assert_eq!(nice_step(12.0, 5), 2.5);
    assert_eq!(nice_step(0.0, 5), 1.0);
    assert_eq!(nice_step(f64::NAN, 5), 1.0);
    assert_eq!(nice_step(700.0, 5), 200.0);
}

#[test]
fn linear_axis_covers_the_data_from_zero() {
    let a = Axis::linear(0.37, 2.41, true);
    assert_eq!(a.min, 0.0);
    assert!(a.max >= 2.41 && a.max <= 3.0, "{a:?}");
    assert_eq!(a.ticks.first(), Some(&0.0));
    assert_eq!(a.ticks.last(), Some(&a.max));
    // Ticks are clean multiples of the step, no float noise.
    assert!(a.ticks.iter().all(|t| format_tick(*t).len() <= 4), "{a:?}");
    assert_eq!(a.frac(a.min), 0.0);
    assert_eq!(a.frac(a.max), 1.0);
}

#[test]
fn degenerate_axes_still_have_a_range() {
    for a in [
        Axis::linear(5.0, 5.0, true),
        Axis::linear(0.0, 0.0, true),
        Axis::linear(f64::INFINITY, f64::NEG_INFINITY, true),
        Axis::linear(-3.0, -3.0, false),
    ] {
        assert!(a.max > a.min, "{a:?}");
        assert!(a.ticks.len() >= 2, "{a:?}");
    }
}

#[test]
fn log_axis_spans_whole_decades() {
    let a = Axis::log10(3.0, 250.0);
    assert_eq!((a.min, a.max), (1.0, 1000.0));
    assert_eq!(a.ticks, vec![1.0, 10.0, 100.0, 1000.0]);
    assert!((a.frac(10.0) - 1.0 / 3.0).abs() < 1e-12);
    let b = Axis::log10(10.0, 10.0);
    assert!(b.max > b.min);
}

#[test]
fn tick_labels() {
    assert_eq!(format_tick(0.0), "0");
    assert_eq!(format_tick(2.5), "2.5");
    assert_eq!(format_tick(0.25), "0.25");
    assert_eq!(format_tick(200.0), "200");
    assert_eq!(format_tick(1.0), "1");
    // Log axes reach far below 1: a decade must not print as 0.
    assert_eq!(format_tick(0.001), "0.001");
    assert_eq!(format_tick(0.00001), "1e-5");
}

fn parse_check(svg: &str) {
    // Well-formed enough for a renderer: one root, balanced elements.
    assert!(svg.starts_with("<svg "), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').expect("unclosed tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
        } else if !tag.ends_with('/') {
            stack.push(tag.split_whitespace().next().unwrap().to_owned());
        }
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

#[test]
fn renders_lines_and_bars_with_escaped_names() {
    let c = Chart {
        title: "Throughput <by> RTT & more".into(),
        subtitle: "2 vCPUs".into(),
        x_label: "RTT (ms)".into(),
        y_label: "GB/s".into(),
        log_y: false,
        body: Body::Lines(vec![
            Series::new("fuse", Style::Measured)
                .point(0.0, 1.1, Some((1.0, 1.2)))
                .point(10.0, 1.0, None),
            Series::new("r3map (published)", Style::Published)
                .point(0.0, 2.4, None)
                .point(40.0, 0.35, None),
        ]),
        notes: vec!["a <note>".into()],
    };
    let svg = c.render();
    parse_check(&svg);
    assert!(svg.contains("Throughput &lt;by&gt; RTT &amp; more"));
    assert!(svg.contains(">fuse<") && svg.contains("r3map (published)"));
    assert!(svg.contains("stroke-dasharray"), "published is dashed");
    assert!(svg.contains("a &lt;note&gt;"));

    let b = Chart {
        body: Body::Bars {
            categories: vec!["read tcp".into(), "read unix".into()],
            groups: vec![
                (
                    "memsync".into(),
                    vec![
                        Some(Bar {
                            value: 4.0,
                            range: Some((3.5, 4.2)),
                        }),
                        None,
                    ],
                ),
                (
                    "nbdkit".into(),
                    vec![
                        Some(Bar {
                            value: 3.0,
                            range: None,
                        }),
                        Some(Bar {
                            value: f64::NAN,
                            range: None,
                        }),
                    ],
                ),
            ],
        },
        log_y: true,
        ..c
    };
    let svg = b.render();
    parse_check(&svg);
    assert_eq!(
        svg.matches("<rect x=").count(),
        2 + 2,
        "two bars, two swatches"
    );
    assert!(!svg.contains("NaN"), "{svg}");
}

#[test]
fn wraps_words() {
    assert_eq!(wrap("a bb ccc dddd", 6), vec!["a bb", "ccc", "dddd"]);
    assert!(wrap("", 5).is_empty());
}
