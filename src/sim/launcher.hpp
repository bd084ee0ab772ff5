// How a `--backend gloo|nccl` run gets its processes: either moe-lbcheck starts them itself
// (`--nproc N`, or the mesh's world size), or it is one rank under an existing launcher.
//
// Environment detection, in order of precedence:
//   1. RANK and WORLD_SIZE (torchrun, torch.distributed.launch), with LOCAL_RANK optional;
//   2. --nproc given: none of the variables below count, this process is the launcher;
//   3. OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE (Open MPI's mpirun), OMPI_COMM_WORLD_LOCAL_RANK;
//   4. SLURM_PROCID and SLURM_NTASKS, only inside a job step (SLURM_STEP_ID or SLURM_STEPID set, as
//      srun sets them; a batch script's own environment is not a step of N ranks), SLURM_LOCALID;
//   otherwise this process launches the ranks itself.
// Every rank needs MASTER_ADDR and MASTER_PORT (the TCPStore of the rendezvous: rank 0 serves it on
// MASTER_PORT, the others connect to MASTER_ADDR:MASTER_PORT; under torchrun's default static
// rendezvous its agent serves it, TORCHELASTIC_USE_AGENT_STORE=True, and rank 0 connects too);
// torchrun sets both, under srun or mpirun export them (e.g. MASTER_ADDR=$(scontrol show hostnames
// | head -n1), MASTER_PORT=29500). Where the store listens is then the launcher's choice. A partial
// or malformed set of variables is a UsageError (exit 2) that names the variable.
//
// The local launcher (launchLocalRanks) keeps everything on this machine: the rendezvous is a c10d
// FileStore in a private (0700) temporary directory and Gloo binds 127.0.0.1, so no socket listens
// beyond loopback. It forks N copies of this process (no exec: LibTorch and the scenario are loaded
// once), each running one rank. The children run in their own process group and die with the
// launcher (PR_SET_PDEATHSIG). On the first rank that fails (non-zero exit or
// a signal), the others get the timeout plus 5 s (MOE_LBCHECK_KILL_GRACE_S overrides) to notice and
// exit with code 3 on their own, printing which operation failed; whatever is left is then killed
// (SIGKILL to the whole group), so no process outlives the launcher. SIGINT/SIGTERM to the launcher
// stop every rank the same way.
// Exit code: rank 0's when every rank exited normally with 0 or rank 0's code (0 pass, 1 a check
// failed, 2 bad input that every rank saw); otherwise 3, with a summary naming the first failing
// rank and how every rank ended.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "scenario/scenario.hpp"

namespace moe {

struct RankEnvironment {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  std::string source;                 // e.g. "torchrun (RANK/WORLD_SIZE)", for messages
  std::string world_variable = "WORLD_SIZE";  // the variable the world size came from
  bool launcher_hosts_store = false;  // the launcher serves the TCPStore (torchrun's agent): rank 0 is a client
  std::string file_store;             // moe-lbcheck's own launcher: a c10d FileStore at this path instead
};

// The rank this process is, from the launcher variables above, or nullopt when this process must
// launch the ranks itself. `nproc_flag` is --nproc (0 when not given). Throws UsageError naming the
// variable when they are incomplete or malformed (RANK without WORLD_SIZE, RANK >= WORLD_SIZE, a
// missing MASTER_ADDR or MASTER_PORT, a port outside 1..65535).
std::optional<RankEnvironment> detectRankEnvironment(int nproc_flag);

// Throws UsageError unless the environment's world size is the mesh's dp*pp*cp and --nproc (when
// given) agrees with it.
void checkRankEnvironment(const RankEnvironment& env, const Scenario& scenario, int nproc_flag);

// Starts `nproc` ranks as forked copies of this process, each running run_rank(its environment), waits
// for them and returns the exit code (see above). Throws UsageError when nproc is not the mesh's world
// size. `backend` is named in messages.
int launchLocalRanks(const Scenario& scenario, int nproc, const std::string& backend,
                     const std::function<int(const RankEnvironment&)>& run_rank);

}  // namespace moe
