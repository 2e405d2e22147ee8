//! ONNX export of the inference graph (opset 17), weights included.
//!
//! The file is a plain `ModelProto` (IR version 8, default domain, opset 17), encoded with
//! `prost` from the hand-declared messages of [`proto`]:
//! - one graph input, `input`, float `[N, C, H, W]` with a symbolic batch dimension `N`;
//! - one graph output, `logits`, float `[N, classes]`;
//! - one initializer per parameter and buffer, named exactly as in the graph and in wrnc
//!   checkpoints (`<node name>.weight|bias|running_mean|running_var`), float, `raw_data`
//!   little-endian; nothing else is an initializer (constants are `Constant` nodes);
//! - every op's output tensor is named after its wrnc node (`3.body.2`); helper tensors add a
//!   suffix (`12.flatten`, `5.shortcut.0.pool`, `5.shortcut.0.pads`).
//!
//! Op mapping (inference semantics, identical to [`crate::cpu::Model::infer`]):
//!
//! | wrnc op | ONNX |
//! |---|---|
//! | `Conv2d` | `Conv` (kernel_shape, strides, pads, group, dilations 1; bias input when present) |
//! | `BatchNorm` | `BatchNormalization` (running statistics, epsilon, momentum `1 - m`) |
//! | `Relu`, `Add` | `Relu`, `Add` |
//! | `Concat` | `Concat` axis 1 |
//! | `MaxPool`, `AvgPool` | `MaxPool`, `AveragePool` with `count_include_pad = 1` |
//! | `GlobalAvgPool` | `GlobalAveragePool` |
//! | `Linear` | `Flatten` (axis 1) then `Gemm` (transB = 1) |
//! | `Dropout`, `DropPath` | `Identity` (inference) |
//! | `ZeroPadShortcut` | `AveragePool` (k = s = stride, when stride > 1) then `Pad` on the channel axis (when channels grow) |
//!
//! Invariants: the bytes are a pure function of the model (graph and state): no time stamps,
//! no hash-map order. Nodes appear in `graph.order` (topological), initializers in the same
//! order, each node's parameters before its buffers.

pub mod proto;

use prost::Message;
use wrnc_compiler::graph::{Graph, Op, Pool};

use crate::cpu::Model;
use crate::Tensor;
use proto::*;

/// The ONNX operator set the export targets.
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with opset 17 (ONNX 1.12).
pub const IR_VERSION: i64 = 8;
/// Name of the graph input.
pub const INPUT: &str = "input";
/// Name of the graph output.
pub const OUTPUT: &str = "logits";
/// Name of the symbolic batch dimension.
pub const BATCH_DIM: &str = "N";
/// Largest file written: a protobuf message may not exceed 2 GiB. (Larger models would need
/// ONNX external data, which this exporter does not write.)
pub const MAX_BYTES: u64 = (1 << 31) - 1;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExportError {
    /// The model's parameters or buffers do not fit its graph.
    #[error("model state: {0}")]
    State(String),
    /// The weights alone exceed [`MAX_BYTES`].
    #[error("the weights take {bytes} bytes; an ONNX file without external data holds at most {MAX_BYTES}")]
    TooLarge { bytes: u64 },
}

/// The ONNX model of `model` in inference mode (see the module docs for the mapping).
pub fn model_proto(model: &Model<f32>) -> Result<ModelProto, ExportError> {
    model
        .check_state()
        .map_err(|e| ExportError::State(e.to_string()))?;
    let g = model.graph();
    let weight_bytes = model
        .params
        .values()
        .chain(model.buffers.values())
        .map(|t| t.data.len() as u64 * 4)
        .sum::<u64>();
    if weight_bytes > MAX_BYTES {
        return Err(ExportError::TooLarge {
            bytes: weight_bytes,
        });
    }
    let graph = graph_proto(g, model)?;
    Ok(ModelProto {
        ir_version: IR_VERSION,
        producer_name: "wrnc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: 1,
        doc_string: format!("{} (inference graph exported by wrnc)", g.name),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        metadata_props: vec![StringStringEntryProto {
            key: "wrnc.network".into(),
            value: g.name.clone(),
        }],
    })
}

/// The ONNX file of `model`, as bytes (deterministic).
pub fn export(model: &Model<f32>) -> Result<Vec<u8>, ExportError> {
    let m = model_proto(model)?;
    let len = m.encoded_len() as u64;
    if len > MAX_BYTES {
        return Err(ExportError::TooLarge { bytes: len });
    }
    Ok(m.encode_to_vec())
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: attr_type::INTS,
        ..Default::default()
    }
}

fn int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: attr_type::INT,
        ..Default::default()
    }
}

fn float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f,
        r#type: attr_type::FLOAT,
        ..Default::default()
    }
}

fn node(
    name: &str,
    op_type: &str,
    input: Vec<String>,
    output: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input,
        output: vec![output.to_string()],
        name: name.to_string(),
        op_type: op_type.to_string(),
        attribute,
        ..Default::default()
    }
}

fn pool_attrs(p: &Pool) -> Vec<AttributeProto> {
    let (k, s, pad) = (p.k as i64, p.stride as i64, p.pad as i64);
    vec![
        ints("kernel_shape", &[k, k]),
        ints("pads", &[pad, pad, pad, pad]),
        ints("strides", &[s, s]),
    ]
}

fn float_tensor(name: &str, t: &Tensor<f32>) -> TensorProto {
    let mut raw = Vec::with_capacity(t.data.len() * 4);
    for v in &t.data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    TensorProto {
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: DT_FLOAT,
        name: name.to_string(),
        raw_data: raw,
        ..Default::default()
    }
}

fn value_info(name: &str, dims: Vec<DimensionValue>) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: DT_FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .into_iter()
                        .map(|v| Dimension { value: Some(v) })
                        .collect(),
                }),
            }),
        }),
        doc_string: String::new(),
    }
}

fn graph_proto(g: &Graph, model: &Model<f32>) -> Result<GraphProto, ExportError> {
    // Tensor name of each node's output.
    let tensor = |n| -> String {
        if n == g.input {
            INPUT.to_string()
        } else if n == g.output {
            OUTPUT.to_string()
        } else {
            g.node(n).name.clone()
        }
    };
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let missing = |what: &str| ExportError::State(format!("missing `{what}`"));
    for &n in &g.order {
        let nd = g.node(n);
        let name = nd.name.as_str();
        let out = tensor(n);
        let ins: Vec<String> = g.inputs(n).into_iter().map(tensor).collect();
        for p in nd.op.params() {
            let full = format!("{name}.{}", p.suffix);
            let t = model.params.get(&full).ok_or_else(|| missing(&full))?;
            inits.push(float_tensor(&full, t));
        }
        for (s, _) in nd.op.buffers() {
            let full = format!("{name}.{s}");
            let t = model.buffers.get(&full).ok_or_else(|| missing(&full))?;
            inits.push(float_tensor(&full, t));
        }
        let w = format!("{name}.weight");
        let b = format!("{name}.bias");
        match &nd.op {
            Op::Input => {}
            Op::Conv2d(c) => {
                let mut inputs = vec![ins[0].clone(), w];
                if c.bias {
                    inputs.push(b);
                }
                let (k, s, p) = (c.k as i64, c.stride as i64, c.pad as i64);
                nodes.push(node(
                    name,
                    "Conv",
                    inputs,
                    &out,
                    vec![
                        ints("dilations", &[1, 1]),
                        int("group", c.groups as i64),
                        ints("kernel_shape", &[k, k]),
                        ints("pads", &[p, p, p, p]),
                        ints("strides", &[s, s]),
                    ],
                ));
            }
            Op::BatchNorm { eps, momentum, .. } => nodes.push(node(
                name,
                "BatchNormalization",
                vec![
                    ins[0].clone(),
                    w,
                    b,
                    format!("{name}.running_mean"),
                    format!("{name}.running_var"),
                ],
                &out,
                // ONNX's momentum weighs the running value (PyTorch's weighs the batch).
                vec![float("epsilon", *eps), float("momentum", 1.0 - *momentum)],
            )),
            Op::Relu => nodes.push(node(name, "Relu", ins, &out, vec![])),
            Op::Dropout { .. } | Op::DropPath { .. } => {
                nodes.push(node(name, "Identity", ins, &out, vec![]))
            }
            Op::Add => nodes.push(node(name, "Add", ins, &out, vec![])),
            Op::Concat => nodes.push(node(name, "Concat", ins, &out, vec![int("axis", 1)])),
            Op::MaxPool(p) => nodes.push(node(name, "MaxPool", ins, &out, pool_attrs(p))),
            Op::AvgPool(p) => {
                let mut attrs = vec![int("count_include_pad", 1)];
                attrs.extend(pool_attrs(p));
                nodes.push(node(name, "AveragePool", ins, &out, attrs))
            }
            Op::GlobalAvgPool => nodes.push(node(name, "GlobalAveragePool", ins, &out, vec![])),
            Op::Linear { .. } => {
                let flat = format!("{name}.flatten");
                nodes.push(node(&flat, "Flatten", ins, &flat, vec![int("axis", 1)]));
                nodes.push(node(
                    name,
                    "Gemm",
                    vec![flat, w, b],
                    &out,
                    vec![
                        float("alpha", 1.0),
                        float("beta", 1.0),
                        int("transA", 0),
                        int("transB", 1),
                    ],
                ));
            }
            Op::ZeroPadShortcut { out_c, stride } => {
                let in_c = g.node(g.inputs(n)[0]).shape.c;
                let grow = out_c.saturating_sub(in_c) as i64;
                let mut x = ins[0].clone();
                if *stride > 1 {
                    let pooled = if grow > 0 {
                        format!("{name}.pool")
                    } else {
                        out.clone()
                    };
                    let p = Pool {
                        k: *stride,
                        stride: *stride,
                        pad: 0,
                    };
                    let mut attrs = vec![int("count_include_pad", 1)];
                    attrs.extend(pool_attrs(&p));
                    nodes.push(node(&pooled, "AveragePool", vec![x], &pooled, attrs));
                    x = pooled;
                }
                if grow > 0 || *stride <= 1 {
                    // [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over N, C, H, W.
                    let pads = format!("{name}.pads");
                    let pads_tensor = TensorProto {
                        dims: vec![8],
                        data_type: DT_INT64,
                        int64_data: vec![0, 0, 0, 0, 0, grow, 0, 0],
                        name: pads.clone(),
                        ..Default::default()
                    };
                    nodes.push(NodeProto {
                        output: vec![pads.clone()],
                        name: pads.clone(),
                        op_type: "Constant".into(),
                        attribute: vec![AttributeProto {
                            name: "value".into(),
                            t: Some(pads_tensor),
                            r#type: attr_type::TENSOR,
                            ..Default::default()
                        }],
                        ..Default::default()
                    });
                    nodes.push(node(name, "Pad", vec![x, pads], &out, vec![]));
                }
            }
        }
    }
    let s = g.input_shape();
    let input = value_info(
        INPUT,
        vec![
            DimensionValue::DimParam(BATCH_DIM.into()),
            DimensionValue::DimValue(s.c as i64),
            DimensionValue::DimValue(s.h as i64),
            DimensionValue::DimValue(s.w as i64),
        ],
    );
    let output = value_info(
        OUTPUT,
        vec![
            DimensionValue::DimParam(BATCH_DIM.into()),
            DimensionValue::DimValue(g.node(g.output).shape.c as i64),
        ],
    );
    Ok(GraphProto {
        node: nodes,
        name: g.name.clone(),
        initializer: inits,
        doc_string: String::new(),
        input: vec![input],
        output: vec![output],
        value_info: vec![],
    })
}
