//! Training as a group of processes: the ranks of an `mpirun` or `srun`
//! launch, talking through MPI (OpenMPI through the `mpi` crate, with
//! `--features mpi`), or a group of one when no launcher started this
//! process (no MPI needed at run time).
//!
//! Every reduction here gives the same bits on every rank (a reduce to rank
//! 0, then a broadcast of its result), so ranks that apply the same update
//! to the same weights keep identical weights; `MPI_Allreduce` does not
//! promise that.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Error, Result};

/// The environment variables launchers set to a process's rank and the
/// group's size: OpenMPI's `mpirun`, PMI (MPICH, Slurm's `srun --mpi=pmi2`)
/// and Slurm itself.
const LAUNCHERS: [(&str, &str); 3] = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS"),
];

/// How long a rank waits in one exchange for the others before it gives up
/// and exits, which makes the launcher end the group: a rank that died or
/// hangs stops the run instead of leaving the others waiting forever.
/// `LVPIPE_COLLECTIVE_TIMEOUT` (seconds) sets it; the default leaves room
/// for the longest step of a long-context stage.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// When this process entered the exchange it is in (milliseconds since the
/// Unix epoch; 0: in none), for the watchdog.
static WAITING_SINCE: AtomicU64 = AtomicU64::new(0);

/// Floats reduced at once: gradients go in buckets of this many (64 MB),
/// so the send buffer stays bounded whatever the model.
pub const BUCKET: usize = 16 << 20;

/// The processes training together, and this one's rank among them.
pub struct Group {
    rank: usize,
    size: usize,
    /// MPI's environment while it is up ([`finalize`] ends it).
    #[cfg(feature = "mpi")]
    mpi: std::sync::Mutex<Option<mpi::environment::Universe>>,
}

static GROUP: OnceLock<Group> = OnceLock::new();

/// A rank's place in its sequence-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqGroup {
    /// Ranks per group: each row is split over this many.
    pub degree: usize,
    /// This rank within its group.
    pub rank: usize,
}

impl Default for SeqGroup {
    fn default() -> Self {
        SeqGroup { degree: 1, rank: 0 }
    }
}

thread_local! {
    /// The sequence-parallel group of the thread that trains (MPI
    /// communicators stay on the thread that made them; candle runs the
    /// forward and backward passes on the calling thread).
    static SEQ: std::cell::Cell<SeqGroup> = std::cell::Cell::new(SeqGroup::default());
}

#[cfg(feature = "mpi")]
thread_local! {
    static SEQ_COMM: std::cell::RefCell<Option<mpi::topology::SimpleCommunicator>> =
        const { std::cell::RefCell::new(None) };
}

/// Joins the group a launcher started this process in ([`Group::from_env`]);
/// once per process, before any training. Later calls return the same
/// group.
pub fn init() -> Result<&'static Group> {
    if let Some(g) = GROUP.get() {
        return Ok(g);
    }
    let g = Group::from_env()?;
    Ok(GROUP.get_or_init(|| g))
}

/// The group [`init`] joined; a group of one where it was never called.
pub fn group() -> &'static Group {
    GROUP.get_or_init(Group::single)
}

/// Leaves the group at the end of a successful run (`MPI_Finalize`, which
/// `mpirun` expects of every rank). After an error, call [`Group::abort`]
/// instead: finalizing waits for ranks that may never come.
pub fn finalize() {
    #[cfg(feature = "mpi")]
    if let Some(g) = GROUP.get() {
        // Communicators are freed before MPI ends (this is the thread
        // that trained and made them).
        SEQ_COMM.with(|c| drop(c.borrow_mut().take()));
        drop(g.mpi.lock().expect("MPI environment lock").take());
    }
}

impl Group {
    /// A group of one: no exchange at all.
    pub fn single() -> Self {
        Group {
            rank: 0,
            size: 1,
            #[cfg(feature = "mpi")]
            mpi: std::sync::Mutex::new(None),
        }
    }

    /// The group a launcher started this process in (MPI), or a group of
    /// one without a launcher. A launch of several processes by a build
    /// without MPI is an error, not N independent runs.
    pub fn from_env() -> Result<Self> {
        let Some((rank, size)) = launched() else {
            return Ok(Self::single());
        };
        #[cfg(feature = "mpi")]
        {
            let _ = (rank, size);
            use mpi::traits::Communicator;
            let universe = mpi::initialize()
                .ok_or_else(|| Error::Config("MPI was initialized twice".into()))?;
            let world = universe.world();
            start_watchdog(world.rank() as usize, world.size() as usize)?;
            Ok(Group {
                rank: world.rank() as usize,
                size: world.size() as usize,
                mpi: std::sync::Mutex::new(Some(universe)),
            })
        }
        #[cfg(not(feature = "mpi"))]
        {
            if size > 1 {
                return Err(Error::Config(format!(
                    "started as rank {rank} of {size} processes, but this lvpipe was built \
                     without MPI: build it with `cargo build --release --features mpi` \
                     (needs libopenmpi-dev)"
                )));
            }
            Ok(Self::single())
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this process writes what the group writes once
    /// (checkpoints, metrics, the model): rank 0.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Sums `values` over the ranks, in place, the same bits on every rank.
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        for bucket in values.chunks_mut(BUCKET) {
            self.reduce_then_broadcast(bucket)?;
        }
        Ok(())
    }

    /// Sums `values` over the ranks, in place, the same bits on every rank.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.reduce_then_broadcast(values)
    }

    /// Every rank's `value`, in rank order, on every rank.
    pub fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        // Exact in f64: two 32-bit halves per rank, zeros elsewhere.
        let mut slots = vec![0f64; 2 * self.size];
        slots[2 * self.rank] = (value >> 32) as f64;
        slots[2 * self.rank + 1] = (value & 0xffff_ffff) as f64;
        self.sum_f64(&mut slots)?;
        Ok(slots
            .chunks(2)
            .map(|h| ((h[0] as u64) << 32) | h[1] as u64)
            .collect())
    }

    /// Waits until every rank got here.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            use mpi::traits::CommunicatorCollectives;
            mpi::topology::SimpleCommunicator::world().barrier();
        }
    }

    /// Ends every process of the group (`MPI_Abort`): what a rank that
    /// failed does, so the others do not wait for it forever.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            use mpi::traits::Communicator;
            mpi::topology::SimpleCommunicator::world().abort(code);
        }
        std::process::exit(code)
    }

    #[cfg(feature = "mpi")]
    fn reduce_then_broadcast<T>(&self, values: &mut [T]) -> Result<()>
    where
        T: mpi::datatype::Equivalence + Copy,
    {
        use mpi::collective::SystemOperation;
        use mpi::traits::{Communicator, Root};
        let world = mpi::topology::SimpleCommunicator::world();
        let root = world.process_at_rank(0);
        WAITING_SINCE.store(now_ms(), Ordering::Relaxed);
        if self.is_root() {
            let mine = values.to_vec();
            root.reduce_into_root(&mine[..], values, SystemOperation::sum());
        } else {
            root.reduce_into(&values[..], SystemOperation::sum());
        }
        root.broadcast_into(values);
        WAITING_SINCE.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Without MPI a group is never larger than one ([`Group::from_env`]).
    /// Splits the group into sequence-parallel groups of `degree`
    /// consecutive ranks (ranks `r` with the same `r / degree` share each
    /// row; 1: none) for the stage about to train. Collective: every rank
    /// calls it with the same degree.
    pub fn set_sequence_parallel(&self, degree: usize) -> Result<SeqGroup> {
        if degree == 0 || !self.size.is_multiple_of(degree) {
            return Err(Error::Config(format!(
                "sequence parallelism of degree {degree} needs a multiple of {degree} ranks; \
                 started with {}",
                self.size
            )));
        }
        let seq = SeqGroup {
            degree,
            rank: self.rank % degree,
        };
        #[cfg(feature = "mpi")]
        if self.size > 1 {
            use mpi::topology::Color;
            use mpi::traits::Communicator;
            let world = mpi::topology::SimpleCommunicator::world();
            let comm = world
                .split_by_color(Color::with_value((self.rank / degree) as i32))
                .ok_or_else(|| Error::Config("MPI did not split the group".into()))?;
            SEQ_COMM.with(|c| *c.borrow_mut() = Some(comm));
        }
        SEQ.with(|s| s.set(seq));
        Ok(seq)
    }

    /// This rank's sequence-parallel group (degree 1 until
    /// [`Group::set_sequence_parallel`]).
    pub fn sequence_parallel(&self) -> SeqGroup {
        SEQ.with(|s| s.get())
    }

    /// This rank's data-parallel rank and the number of data-parallel
    /// ranks: the sequence-parallel groups.
    pub fn data_parallel(&self) -> (usize, usize) {
        let degree = self.sequence_parallel().degree;
        (self.rank / degree, self.size / degree)
    }

    /// All-to-all within the sequence-parallel group: `send` is `degree`
    /// equal blocks, block `j` goes to the group's rank `j`, and block `i`
    /// of the result came from rank `i`.
    pub fn seq_all_to_all(&self, send: &[f32]) -> Result<Vec<f32>> {
        if self.sequence_parallel().degree == 1 {
            return Ok(send.to_vec());
        }
        self.seq_collective(|comm| {
            #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
            let mut recv = vec![0f32; send.len()];
            #[cfg(feature = "mpi")]
            {
                use mpi::traits::CommunicatorCollectives;
                comm.all_to_all_into(send, &mut recv[..]);
            }
            #[cfg(not(feature = "mpi"))]
            let _ = comm;
            recv
        })
    }

    /// One step around the sequence-parallel group's ring: `send` goes to
    /// the next rank (the previous one with `backward`), and what the
    /// other neighbour sent is returned (of the same length).
    pub fn seq_ring_shift(&self, send: &[f32], backward: bool) -> Result<Vec<f32>> {
        let seq = self.sequence_parallel();
        if seq.degree == 1 {
            return Ok(send.to_vec());
        }
        let (next, prev) = (
            (seq.rank + 1) % seq.degree,
            (seq.rank + seq.degree - 1) % seq.degree,
        );
        let (to, from) = if backward { (prev, next) } else { (next, prev) };
        self.seq_collective(|comm| {
            #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
            let mut recv = vec![0f32; send.len()];
            #[cfg(feature = "mpi")]
            {
                use mpi::traits::Communicator;
                mpi::point_to_point::send_receive_into(
                    send,
                    &comm.process_at_rank(to as i32),
                    &mut recv[..],
                    &comm.process_at_rank(from as i32),
                );
            }
            #[cfg(not(feature = "mpi"))]
            let _ = (comm, to, from);
            recv
        })
    }

    /// Sums `values` over the sequence-parallel group, in place.
    pub fn seq_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        if self.sequence_parallel().degree == 1 {
            return Ok(());
        }
        self.seq_collective(|comm| {
            #[cfg(feature = "mpi")]
            {
                use mpi::collective::SystemOperation;
                use mpi::traits::CommunicatorCollectives;
                let mine = values.to_vec();
                comm.all_reduce_into(&mine[..], values, SystemOperation::sum());
            }
            #[cfg(not(feature = "mpi"))]
            let _ = (comm, &values);
        })
    }

    /// Runs `f` on the sequence-parallel communicator, watched by the
    /// collective timeout.
    #[cfg(feature = "mpi")]
    fn seq_collective<T>(
        &self,
        f: impl FnOnce(&mpi::topology::SimpleCommunicator) -> T,
    ) -> Result<T> {
        SEQ_COMM.with(|c| {
            let comm = c.borrow();
            let comm = comm
                .as_ref()
                .ok_or_else(|| Error::Config("no sequence-parallel group on this thread".into()))?;
            WAITING_SINCE.store(now_ms(), Ordering::Relaxed);
            let out = f(comm);
            WAITING_SINCE.store(0, Ordering::Relaxed);
            Ok(out)
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn seq_collective<T>(&self, _: impl FnOnce(&()) -> T) -> Result<T> {
        Err(Error::Config(
            "a group of several processes needs MPI (--features mpi)".into(),
        ))
    }

    #[cfg(not(feature = "mpi"))]
    fn reduce_then_broadcast<T>(&self, _: &mut [T]) -> Result<()> {
        Err(Error::Config(
            "a group of several processes needs MPI (--features mpi)".into(),
        ))
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A thread that ends this process when it has waited in one exchange
/// longer than the timeout (`LVPIPE_COLLECTIVE_TIMEOUT` seconds, else
/// [`DEFAULT_TIMEOUT`]). It exits rather than calling `MPI_Abort`, which
/// MPI does not allow from a second thread here; the launcher then ends
/// the other ranks.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn start_watchdog(rank: usize, size: usize) -> Result<()> {
    let timeout = match std::env::var("LVPIPE_COLLECTIVE_TIMEOUT") {
        Ok(s) => Duration::from_secs_f64(s.trim().parse::<f64>().map_err(|_| {
            Error::Config(format!("LVPIPE_COLLECTIVE_TIMEOUT={s}: expected seconds"))
        })?),
        Err(_) => DEFAULT_TIMEOUT,
    };
    let every = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    std::thread::Builder::new()
        .name("lvpipe-watchdog".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let since = WAITING_SINCE.load(Ordering::Relaxed);
                let waited = Duration::from_millis(now_ms().saturating_sub(since));
                if since != 0 && waited > timeout {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!(
                            "lvpipe: error: rank {rank} of {size}: waited {:.0} s for the other \
                             ranks in an exchange (LVPIPE_COLLECTIVE_TIMEOUT is {:.0} s): a rank \
                             is stuck or dead; the checkpoints on disk can be resumed",
                            waited.as_secs_f64(),
                            timeout.as_secs_f64()
                        );
                    }
                    std::process::exit(2);
                }
            }
        })
        .map_err(Error::Io)?;
    Ok(())
}

/// (rank, size) as a launcher set them, if one did.
fn launched() -> Option<(usize, usize)> {
    let var = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
    LAUNCHERS
        .iter()
        .find_map(|(rank, size)| Some((var(rank)?, var(size)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_of_one_keeps_its_values() {
        let g = Group::single();
        assert!(g.is_root() && g.size() == 1);
        let mut v = vec![1.5f32, -2.0];
        g.sum_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(g.gather_u64(u64::MAX - 5).unwrap(), [u64::MAX - 5]);
    }
}
