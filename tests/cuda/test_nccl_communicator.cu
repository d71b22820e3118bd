// SPDX-License-Identifier: MIT
// SPDX-FileCopyrightText: dmoe authors
// The NCCL communicator (dmoe/parallel/nccl.cuh): one rank per visible GPU (up to 4), one host
// thread per rank, an all-to-all-v with a different byte count for every (sender, receiver) pair
// and a zero-byte pair; every received byte is checked. Without a device it prints DMOE_SKIP
// (CTest reports the test as skipped, not passed).
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <dmoe/parallel/nccl.cuh>

namespace {

// Bytes rank q sends to rank p: 0 for one pair, so that a zero-byte exchange is covered.
std::size_t pair_bytes(int q, int p) { return (q == 0 && p == 1) ? 0 : std::size_t(1000 * (q + 1) + 37 * p); }
unsigned char value(int q, int p, std::size_t i) { return static_cast<unsigned char>(q * 31 + p * 7 + i % 251); }

int run_rank(ncclComm_t comm, int device, int R, std::string& err) {
  cudaSetDevice(device);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  dmoe::nccl_communicator c(comm, stream);
  const int me = c.rank();
  std::vector<std::size_t> sb(R), so(R), rb(R), ro(R);
  std::size_t st = 0, rt = 0;
  for (int p = 0; p < R; ++p) {
    sb[p] = pair_bytes(me, p);
    so[p] = st;
    st += sb[p];
    rb[p] = pair_bytes(p, me);
    ro[p] = rt;
    rt += rb[p];
  }
  std::vector<unsigned char> hs(st), hr(rt, 0);
  for (int p = 0; p < R; ++p)
    for (std::size_t i = 0; i < sb[p]; ++i) hs[so[p] + i] = value(me, p, i);
  void *ds = nullptr, *dr = nullptr;
  cudaMalloc(&ds, st + 1);
  cudaMalloc(&dr, rt + 1);
  cudaMemcpy(ds, hs.data(), st, cudaMemcpyHostToDevice);
  const dmoe::status s = c.alltoallv(ds, sb.data(), so.data(), dr, rb.data(), ro.data());
  cudaMemcpy(hr.data(), dr, rt, cudaMemcpyDeviceToHost);
  cudaFree(ds);
  cudaFree(dr);
  cudaStreamDestroy(stream);
  if (!s.ok()) {
    err = s.message();
    return 1;
  }
  for (int q = 0; q < R; ++q)
    for (std::size_t i = 0; i < rb[q]; ++i)
      if (hr[ro[q] + i] != value(q, me, i)) {
        err = "rank " + std::to_string(me) + ": byte " + std::to_string(i) + " from rank " + std::to_string(q) +
              " differs";
        return 1;
      }
  return 0;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("DMOE_SKIP: no CUDA device\n");
    return 0;
  }
  const int R = devices < 4 ? devices : 4;
  std::vector<ncclComm_t> comms(R);
  std::vector<int> dev(R);
  for (int r = 0; r < R; ++r) dev[r] = r;
  if (ncclCommInitAll(comms.data(), R, dev.data()) != ncclSuccess) {
    std::printf("FAILED: ncclCommInitAll on %d devices\n", R);
    return 1;
  }
  std::vector<int> rc(R, 0);
  std::vector<std::string> err(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r) th.emplace_back([&, r] { rc[r] = run_rank(comms[r], dev[r], R, err[r]); });
  for (auto& t : th) t.join();
  int bad = 0;
  for (int r = 0; r < R; ++r) {
    if (rc[r]) std::printf("FAILED: %s\n", err[r].c_str());
    bad += rc[r];
    ncclCommDestroy(comms[r]);
  }
  if (bad == 0) std::printf("nccl all-to-all-v on %d GPU rank(s): every byte arrived\n", R);
  return bad ? 1 : 0;
}
