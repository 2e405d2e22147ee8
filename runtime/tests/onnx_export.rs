//! The ONNX export's structure, without any ONNX implementation: decode the bytes with the
//! same prost messages and check the interface, the op mapping, the initializer names and
//! shapes, and determinism. (`onnx_roundtrip.rs` runs the files in onnxruntime.)

use prost::Message;
use wrnc_compiler::graph::Graph;
use wrnc_runtime::checkpoint;
use wrnc_runtime::cpu::Model;
use wrnc_runtime::onnx::{self, proto::*, ExportError};
use wrnc_runtime::Tensor;

fn graph(text: &str) -> Graph {
    wrnc_grammar::build(&wrnc_grammar::Source::inline(text))
        .unwrap_or_else(|d| panic!("{text}\n{}", d.render()))
}

fn decode(bytes: &[u8]) -> ModelProto {
    ModelProto::decode(bytes).expect("the export decodes")
}

/// `op_type(inputs)->output [attrs]`, one line per node, for compact expectations.
fn summary(m: &ModelProto) -> Vec<String> {
    let g = m.graph.as_ref().unwrap();
    g.node
        .iter()
        .map(|n| {
            let attrs: Vec<String> = n
                .attribute
                .iter()
                .map(|a| match a.r#type {
                    attr_type::INT => format!("{}={}", a.name, a.i),
                    attr_type::FLOAT => format!("{}={}", a.name, a.f),
                    attr_type::INTS => format!("{}={:?}", a.name, a.ints),
                    attr_type::TENSOR => {
                        let t = a.t.as_ref().unwrap();
                        format!("{}={:?}", a.name, t.int64_data)
                    }
                    t => format!("{}:type{t}", a.name),
                })
                .collect();
            format!(
                "{}({})->{} [{}]",
                n.op_type,
                n.input.join(","),
                n.output.join(","),
                attrs.join(" ")
            )
        })
        .collect()
}

/// Each case: a network and the exact node list of its export.
#[test]
fn op_mapping() {
    let cases: &[(&str, &[&str])] = &[
        (
            "network { input 3x8x8 classes 4 conv(3x3, 8, stride=2, pad=1, groups=1, bias) bn relu dropout(0.5) gap fc }",
            &[
                "Conv(input,0.weight,0.bias)->0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[2, 2]]",
                "BatchNormalization(0,1.weight,1.bias,1.running_mean,1.running_var)->1 [epsilon=0.00001 momentum=0.9]",
                "Relu(1)->2 []",
                "Identity(2)->3 []",
                "GlobalAveragePool(3)->4 []",
                "Flatten(4)->5.flatten [axis=1]",
                "Gemm(5.flatten,5.weight,5.bias)->logits [alpha=1 beta=1 transA=0 transB=1]",
            ],
        ),
        (
            "network { input 4x8x8 classes 3 conv(1x1, 8, groups=4, pad=0) maxpool(3x3, stride=2, pad=1) avgpool(2x2, stride=1, pad=1) fc }",
            &[
                "Conv(input,0.weight)->0 [dilations=[1, 1] group=4 kernel_shape=[1, 1] pads=[0, 0, 0, 0] strides=[1, 1]]",
                "MaxPool(0)->1 [kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[2, 2]]",
                "AveragePool(1)->2 [count_include_pad=1 kernel_shape=[2, 2] pads=[1, 1, 1, 1] strides=[1, 1]]",
                "Flatten(2)->3.flatten [axis=1]",
                "Gemm(3.flatten,3.weight,3.bias)->logits [alpha=1 beta=1 transA=0 transB=1]",
            ],
        ),
        (
            // Zero-pad shortcut with stride and growth; DropPath; post-activation.
            "network { input 3x8x8 classes 2 conv(3x3, 4) residual { body conv(3x3, 6, stride=2) shortcut zeropad post relu survival 0.5 } gap fc }",
            &[
                "Conv(input,0.weight)->0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[1, 1]]",
                "Conv(0,1.body.0.weight)->1.body.0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[2, 2]]",
                "AveragePool(0)->1.shortcut.0.pool [count_include_pad=1 kernel_shape=[2, 2] pads=[0, 0, 0, 0] strides=[2, 2]]",
                "Constant()->1.shortcut.0.pads [value=[0, 0, 0, 0, 0, 2, 0, 0]]",
                "Pad(1.shortcut.0.pool,1.shortcut.0.pads)->1.shortcut.0 []",
                "Identity(1.body.0)->1.droppath []",
                "Add(1.droppath,1.shortcut.0)->1.add []",
                "Relu(1.add)->1.post.0 []",
                "GlobalAveragePool(1.post.0)->2 []",
                "Flatten(2)->3.flatten [axis=1]",
                "Gemm(3.flatten,3.weight,3.bias)->logits [alpha=1 beta=1 transA=0 transB=1]",
            ],
        ),
        (
            // Zero-pad shortcut: stride only (AveragePool, no Pad), then channels only (Pad).
            "network { input 3x8x8 classes 2 conv(3x3, 4) residual { body conv(3x3, 4, stride=2) shortcut zeropad } residual { body conv(3x3, 5) shortcut zeropad } gap fc }",
            &[
                "Conv(input,0.weight)->0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[1, 1]]",
                "Conv(0,1.body.0.weight)->1.body.0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[2, 2]]",
                "AveragePool(0)->1.shortcut.0 [count_include_pad=1 kernel_shape=[2, 2] pads=[0, 0, 0, 0] strides=[2, 2]]",
                "Add(1.body.0,1.shortcut.0)->1.add []",
                "Conv(1.add,2.body.0.weight)->2.body.0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[1, 1]]",
                "Constant()->2.shortcut.0.pads [value=[0, 0, 0, 0, 0, 1, 0, 0]]",
                "Pad(1.add,2.shortcut.0.pads)->2.shortcut.0 []",
                "Add(2.body.0,2.shortcut.0)->2.add []",
                "GlobalAveragePool(2.add)->3 []",
                "Flatten(3)->4.flatten [axis=1]",
                "Gemm(4.flatten,4.weight,4.bias)->logits [alpha=1 beta=1 transA=0 transB=1]",
            ],
        ),
        (
            // Pre-activation with a projection + BN shortcut, then a dense unit.
            "network { input 3x4x4 classes 2 residual { pre bn body conv(3x3, 4) shortcut projbn } dense { relu conv(1x1, 2) } fc }",
            &[
                "BatchNormalization(input,0.pre.0.weight,0.pre.0.bias,0.pre.0.running_mean,0.pre.0.running_var)->0.pre.0 [epsilon=0.00001 momentum=0.9]",
                "Conv(0.pre.0,0.body.0.weight)->0.body.0 [dilations=[1, 1] group=1 kernel_shape=[3, 3] pads=[1, 1, 1, 1] strides=[1, 1]]",
                "Conv(0.pre.0,0.shortcut.0.weight)->0.shortcut.0 [dilations=[1, 1] group=1 kernel_shape=[1, 1] pads=[0, 0, 0, 0] strides=[1, 1]]",
                "BatchNormalization(0.shortcut.0,0.shortcut.1.weight,0.shortcut.1.bias,0.shortcut.1.running_mean,0.shortcut.1.running_var)->0.shortcut.1 [epsilon=0.00001 momentum=0.9]",
                "Add(0.body.0,0.shortcut.1)->0.add []",
                "Relu(0.add)->1.0 []",
                "Conv(1.0,1.1.weight)->1.1 [dilations=[1, 1] group=1 kernel_shape=[1, 1] pads=[0, 0, 0, 0] strides=[1, 1]]",
                "Concat(0.add,1.1)->1.concat [axis=1]",
                "Flatten(1.concat)->2.flatten [axis=1]",
                "Gemm(2.flatten,2.weight,2.bias)->logits [alpha=1 beta=1 transA=0 transB=1]",
            ],
        ),
    ];
    for (text, expect) in cases {
        let m = Model::new(graph(text), 1).unwrap();
        let got = summary(&decode(&onnx::export(&m).unwrap()));
        assert_eq!(got, *expect, "{text}");
    }
}

/// The interface, the opset, and the initializers: exactly the checkpoint's tensors, by name,
/// shape and value, in the checkpoint's order per node.
#[test]
fn interface_and_initializers() {
    for text in [
        "WRN-10-1",
        "DenseNet-BC-10-4",
        "ResNeXt-11-2x4d",
        "PyramidNet-8-4",
    ] {
        let m = Model::new(graph(text), 7).unwrap();
        let p = decode(&onnx::export(&m).unwrap());
        assert_eq!(p.ir_version, onnx::IR_VERSION);
        assert_eq!(
            p.opset_import,
            vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17
            }]
        );
        let g = p.graph.unwrap();
        let dims = |v: &ValueInfoProto| -> Vec<String> {
            let t = v.r#type.as_ref().unwrap().tensor_type.as_ref().unwrap();
            assert_eq!(t.elem_type, DT_FLOAT);
            t.shape
                .as_ref()
                .unwrap()
                .dim
                .iter()
                .map(|d| match d.value.as_ref().unwrap() {
                    DimensionValue::DimValue(v) => v.to_string(),
                    DimensionValue::DimParam(s) => s.clone(),
                })
                .collect()
        };
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.input[0].name, "input");
        assert_eq!(dims(&g.input[0]), ["N", "3", "32", "32"], "{text}");
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, "logits");
        assert_eq!(dims(&g.output[0]), ["N", "10"], "{text}");
        // Initializers: the checkpoint's tensors, same set; values bit-equal.
        let mut names: Vec<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        let mut expected = checkpoint::expected_tensors(m.graph());
        expected.sort();
        let exp_names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, exp_names, "{text}");
        for t in &g.initializer {
            let want = m
                .params
                .get(&t.name)
                .or_else(|| m.buffers.get(&t.name))
                .unwrap();
            let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            assert_eq!(shape, want.shape, "{}", t.name);
            assert_eq!(t.data_type, DT_FLOAT);
            let vals: Vec<f32> = t
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(vals, want.data, "{}", t.name);
        }
        // Every node input is the graph input, an initializer or an earlier node's output.
        let mut known: std::collections::BTreeSet<String> =
            names.iter().map(|s| s.to_string()).collect();
        known.insert("input".into());
        for n in &g.node {
            for i in &n.input {
                assert!(
                    known.contains(i),
                    "{text}: {} reads {i} before it exists",
                    n.name
                );
            }
            for o in &n.output {
                assert!(known.insert(o.clone()), "{text}: {o} written twice");
            }
        }
        assert!(known.contains("logits"));
    }
}

#[test]
fn bytes_are_deterministic() {
    let a = onnx::export(&Model::new(graph("WRN-10-2"), 3).unwrap()).unwrap();
    let b = onnx::export(&Model::new(graph("WRN-10-2"), 3).unwrap()).unwrap();
    let c = onnx::export(&Model::new(graph("WRN-10-2"), 4).unwrap()).unwrap();
    assert!(a == b, "same model, different bytes");
    assert!(a != c, "different weights, same bytes");
    assert_eq!(a.len(), b.len());
}

#[test]
fn bad_state_is_an_error() {
    let mut m = Model::new(graph("WRN-10-1"), 1).unwrap();
    let name = m.params.keys().next().unwrap().clone();
    m.params.insert(name.clone(), Tensor::zeros(&[1]));
    match onnx::export(&m) {
        Err(ExportError::State(msg)) => assert!(msg.contains(&name), "{msg}"),
        other => panic!("expected a state error, got {other:?}"),
    }
    let mut m = Model::new(graph("WRN-10-1"), 1).unwrap();
    let name = m.buffers.keys().next().unwrap().clone();
    m.buffers.remove(&name);
    match onnx::export(&m) {
        Err(ExportError::State(msg)) => assert!(msg.contains(&name), "{msg}"),
        other => panic!("expected a state error, got {other:?}"),
    }
}
