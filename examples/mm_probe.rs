use llama_pro::core::burn::backend::Flex;
use llama_pro::core::burn::tensor::{Distribution, Tensor};
use std::time::Instant;
fn main() {
    let d = Default::default();
    let shapes = [
        (1024, 256, 256),
        (1024, 256, 688),
        (1024, 688, 256),
        (1024, 256, 4096),
        (1024, 4096, 256),
        (256, 1024, 688),
        (1024, 512, 512),
        (1024, 512, 1376),
        (1024, 1376, 512),
        (1024, 512, 8192),
    ];
    for (m, k, n) in shapes {
        let a = Tensor::<Flex, 2>::random([m, k], Distribution::Default, &d);
        let b = Tensor::<Flex, 2>::random([k, n], Distribution::Default, &d);
        let bt = Tensor::<Flex, 2>::random([n, k], Distribution::Default, &d).transpose();
        for (name, bb) in [("nn", b), ("nt", bt)] {
            for _ in 0..3 {
                let _ = a.clone().matmul(bb.clone()).into_data();
            }
            let it = 30;
            let t = Instant::now();
            for _ in 0..it {
                let _ = a.clone().matmul(bb.clone());
            }
            let dt = t.elapsed().as_secs_f64() / it as f64;
            println!(
                "{m}x{k}x{n} {name}: {:.1} GFLOP/s",
                2.0 * (m * n * k) as f64 / dt / 1e9
            );
        }
    }
}
