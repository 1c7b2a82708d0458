//! Pre-tokenized (`tokens:`) and Parquet LLaVA (`llava-parquet:`) sources:
//! streamed from Parquet, Arrow IPC and JSONL, ids kept as they are with
//! every token in the loss, bad rows quarantined by row between good ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Int32Builder, ListBuilder, RecordBatch, StringBuilder, StructBuilder,
};
use arrow::datatypes::{DataType, Field, Fields, Schema, UInt32Type};
use lvpipe_sharding::{BuildSettings, SourceSpec, build_shards};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;

fn qwen2_tokenizer(dir: &Path) -> PathBuf {
    let packed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tokenizers/qwen2.tokenizer.json.zst"),
    )
    .unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, zstd::decode_all(packed.as_slice()).unwrap()).unwrap();
    path
}

fn ids_batch(rows: &[Option<Vec<i32>>]) -> RecordBatch {
    let mut ids = ListBuilder::new(Int32Builder::new());
    for row in rows {
        match row {
            Some(r) => {
                ids.values().append_slice(r);
                ids.append(true);
            }
            None => ids.append(false),
        }
    }
    RecordBatch::try_from_iter([("input_ids", Arc::new(ids.finish()) as _)]).unwrap()
}

/// A sample as read back: origin, input_ids, loss_mask.
type Sample = (String, Vec<u32>, Vec<u8>);

/// Every sample and the quarantine's (origin, reason), by origin.
fn read_back(out: &Path) -> (Vec<Sample>, Vec<(String, String)>) {
    let (mut samples, mut quarantine) = (Vec::new(), Vec::new());
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
    {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let b = batch.unwrap();
            let origin = b
                .column_by_name("origin")
                .unwrap()
                .as_string::<i32>()
                .clone();
            if name.starts_with("samples") {
                let ids = b
                    .column_by_name("input_ids")
                    .unwrap()
                    .as_list::<i32>()
                    .clone();
                let mask = b
                    .column_by_name("loss_mask")
                    .unwrap()
                    .as_list::<i32>()
                    .clone();
                for r in 0..b.num_rows() {
                    let id: Vec<u32> = ids.value(r).as_primitive::<UInt32Type>().values().to_vec();
                    let m = mask.value(r);
                    let m: Vec<u8> = (0..m.len())
                        .map(|i| {
                            arrow::compute::cast(&m.slice(i, 1), &DataType::UInt8)
                                .unwrap()
                                .as_primitive::<arrow::datatypes::UInt8Type>()
                                .value(0)
                        })
                        .collect();
                    samples.push((origin.value(r).to_string(), id, m));
                }
            } else if name.starts_with("quarantine") {
                let reason = b
                    .column_by_name("reason")
                    .unwrap()
                    .as_string::<i32>()
                    .clone();
                for r in 0..b.num_rows() {
                    quarantine.push((origin.value(r).to_string(), reason.value(r).to_string()));
                }
            }
        }
    }
    samples.sort();
    quarantine.sort();
    (samples, quarantine)
}

fn tail(origin: &str) -> String {
    origin.rsplit('/').next().unwrap().to_string()
}

#[test]
fn pre_tokenized_rows_keep_their_ids_from_parquet_arrow_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = qwen2_tokenizer(dir.path());
    // Parquet in row groups of 2: a good group, a group with an empty and
    // an out-of-vocabulary row, a group with a null row and a good one.
    let parquet = dir.path().join("slimpajama.parquet");
    let rows = [
        Some(vec![9707, 11, 1879]),
        Some(vec![1, 2]),
        Some(vec![]),
        Some(vec![3, 200_000]),
        None,
        Some(vec![42]),
    ];
    let batch = ids_batch(&rows);
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(&parquet).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    // Arrow IPC, file format.
    let arrow_path = dir.path().join("more.arrow");
    let small = ids_batch(&[Some(vec![5, 6, 7])]);
    let mut w = arrow::ipc::writer::FileWriter::try_new(
        std::fs::File::create(&arrow_path).unwrap(),
        &small.schema(),
    )
    .unwrap();
    w.write(&small).unwrap();
    w.finish().unwrap();
    // JSONL.
    let jsonl = dir.path().join("ids.jsonl");
    std::fs::write(
        &jsonl,
        "{\"input_ids\": [8, 9]}\n{\"input_ids\": [-1]}\n{\"text\": \"x\"}\n",
    )
    .unwrap();

    let out = dir.path().join("shards");
    let sources = [&parquet, &arrow_path, &jsonl]
        .iter()
        .map(|p| SourceSpec::parse(&format!("tokens:{}", p.display()), None).unwrap())
        .collect();
    let settings = BuildSettings::new(&out, &tokenizer).with_sources(sources);
    let summary = build_shards(&settings, &|_| {}).unwrap();
    assert_eq!(
        (summary.samples, summary.quarantined),
        (5, 5),
        "{summary:?}"
    );
    let (samples, quarantine) = read_back(&out);
    let got: Vec<(String, Vec<u32>)> = samples
        .iter()
        .map(|(o, ids, mask)| {
            assert!(mask.iter().all(|&m| m == 1), "{o}: every token in the loss");
            (tail(o), ids.clone())
        })
        .collect();
    let want: Vec<(String, Vec<u32>)> = [
        ("ids.jsonl:1", vec![8, 9]),
        ("more.arrow:row 1", vec![5, 6, 7]),
        ("slimpajama.parquet:row 1", vec![9707, 11, 1879]),
        ("slimpajama.parquet:row 2", vec![1, 2]),
        ("slimpajama.parquet:row 6", vec![42]),
    ]
    .into_iter()
    .map(|(o, ids)| (o.to_string(), ids))
    .collect();
    assert_eq!(got, want);
    let reasons: Vec<(String, String)> = quarantine
        .iter()
        .map(|(o, r)| (tail(o), r.clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("ids.jsonl:2", "invalid_tokens"),
            ("ids.jsonl:3", "invalid_tokens"),
            ("slimpajama.parquet:row 3", "invalid_tokens"),
            ("slimpajama.parquet:row 4", "invalid_tokens"),
            ("slimpajama.parquet:row 5", "invalid_tokens"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
}

#[test]
fn llava_annotations_in_parquet_become_the_samples_their_json_makes() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = qwen2_tokenizer(dir.path());
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]))
        .save(dir.path().join("red.png"))
        .unwrap();
    let turn = Fields::from(vec![
        Field::new("from", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
    ]);
    let mut ids = StringBuilder::new();
    let mut images = StringBuilder::new();
    let mut convs = ListBuilder::new(StructBuilder::from_fields(turn.clone(), 4));
    let rows = [
        ("a", Some("red.png"), "<image>\nWhat colour?", "Red."),
        ("b", Some("gone.png"), "<image>\nWhat colour?", "Blue."),
        ("c", None, "Say hi.", "Hi."),
    ];
    for (id, image, question, answer) in rows {
        ids.append_value(id);
        images.append_option(image);
        for (from, value) in [("human", question), ("gpt", answer)] {
            let s = convs.values();
            s.field_builder::<StringBuilder>(0)
                .unwrap()
                .append_value(from);
            s.field_builder::<StringBuilder>(1)
                .unwrap()
                .append_value(value);
            s.append(true);
        }
        convs.append(true);
    }
    let convs = convs.finish();
    let schema = Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Utf8, true),
        Field::new("conversations", convs.data_type().clone(), false),
    ]);
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(ids.finish()),
            Arc::new(images.finish()),
            Arc::new(convs),
        ],
    )
    .unwrap();
    let parquet = dir.path().join("sft.parquet");
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(&parquet).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    // The same annotations as VILA's JSON.
    let json = dir.path().join("sft.json");
    let records: Vec<serde_json::Value> = rows
        .iter()
        .map(|(id, image, q, a)| {
            let mut v = serde_json::json!({"id": id, "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": a}]});
            if let Some(i) = image {
                v["image"] = (*i).into();
            }
            v
        })
        .collect();
    std::fs::write(&json, serde_json::to_string(&records).unwrap()).unwrap();

    let mut results = Vec::new();
    for (name, spec) in [
        ("parquet", format!("p=llava-parquet:{}", parquet.display())),
        ("json", format!("p=llava:{}", json.display())),
    ] {
        let out = dir.path().join(name);
        let source = SourceSpec::parse(&spec, Some(dir.path())).unwrap();
        let settings = BuildSettings::new(&out, &tokenizer).with_sources(vec![source]);
        let summary = build_shards(&settings, &|_| {}).unwrap();
        assert_eq!(
            (summary.samples, summary.quarantined),
            (2, 1),
            "{name}: {summary:?}"
        );
        let (samples, quarantine) = read_back(&out);
        assert_eq!(quarantine.len(), 1);
        assert_eq!(quarantine[0].1, "missing_media", "{name}");
        results.push(
            samples
                .into_iter()
                .map(|(_, ids, mask)| (ids, mask))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        results[0], results[1],
        "Parquet and JSON give the same samples"
    );
}
