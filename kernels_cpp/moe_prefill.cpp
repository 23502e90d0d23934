// Prefill schedule of moe::forward() for the tiled methods (many rows per expert; baseline x86-64): activations
// are quantized once per token and packed per expert into the AMX A-tile layout (ALayout::panel) just
// before that expert's gate/up tasks, which cover an expert x several 32-row groups in token blocks
// that stay in L2; the down stage runs per column chunk over every expert. Results are identical
// to the decode schedule (moe_decode.cpp); see moe_schedule.hpp for the task stages.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "moe_schedule.hpp"
#include "tuning.hpp"

namespace kt {
namespace moe {
namespace detail {

namespace {

// Buffers of one prefill call, kept between calls (WorkspaceLease).
struct Workspace {
  Buf xq, xqd, xqs, xpan, xd, xs, act, apan, ad, as, acc, dacc, y, qtmp;
};

// Rows per token block of expert a's gate/up tasks (a multiple of 32; the last block shorter):
// m rows in balanced blocks whose activation panel (rows x H bytes) fits
// tuning().prefill_a_block_bytes, so that it stays in L2 while the task's row groups use it.
std::vector<int64_t> token_block_rows(const std::vector<int64_t>& m_of, int64_t H) {
  const int64_t budget = tuning().prefill_a_block_bytes.load(std::memory_order_relaxed);
  const int64_t cap = std::max<int64_t>(32, budget / H / 32 * 32);
  std::vector<int64_t> rows(m_of.size());
  for (size_t a = 0; a < m_of.size(); ++a) {
    const int64_t n = (m_of[a] + cap - 1) / cap;
    rows[a] = round_up((m_of[a] + n - 1) / n, 32);
  }
  return rows;
}

}  // namespace

void forward_prefill(const Call& call) {
  const Weights& weights = call.weights;
  const Config& cfg = weights.cfg;
  const Routing& rt = call.route;
  const float* x = call.x;
  float* out = call.out;
  const int64_t tokens = call.tokens;
  const DotFn dot = call.k.tiled.dot;
  const Epilogue& epi = *call.k.epilogue;
  const std::vector<int64_t>& active = rt.active;
  const std::vector<int64_t>& m_of = rt.m_of;
  const std::vector<int64_t>& row0 = rt.row0;
  const int64_t H = cfg.hidden, T = cfg.threadpool_count, IL = cfg.i_local();
  const int64_t A = rt.experts(), R = rt.rows(), mmax = rt.max_rows();
  const int P = call.pool.size();
  StageProfile profile(P, call.t_call);

  // ---- per-expert panels: rows padded to 16 (the AMX kernel reads whole 16-row tiles)
  std::vector<int64_t> pan0(A + 1, 0);
  for (int64_t a = 0; a < A; ++a) pan0[a + 1] = pan0[a] + round_up(m_of[a], 16);
  const int64_t NP = pan0[A];
  const std::vector<int64_t> first_row = first_rows(rt, tokens, out, H);
  const ALayout LX = ALayout::panel(H), LA = ALayout::panel(IL);

  WorkspaceLease<Workspace> lease;
  Workspace& ws = *lease;
  int8_t* xq = ws.xq.get<int8_t>(tokens * H);  // token-major int8 x
  float* xqd = ws.xqd.get<float>(tokens);
  int32_t* xqs = ws.xqs.get<int32_t>(tokens);
  int8_t* xpan = ws.xpan.get<int8_t>(NP * H);  // expert a: rows pan0[a].., layout LX
  float* xd = ws.xd.get<float>(R);
  int32_t* xs = ws.xs.get<int32_t>(R);
  float* act = ws.act.get<float>(R * T * IL);    // [a][t][m][IL]
  int8_t* apan = ws.apan.get<int8_t>(NP * T * IL);  // (a, t): rows (pan0[a]*T + t*mpad) .., layout LA
  float* ad = ws.ad.get<float>(R * T);
  int32_t* as = ws.as.get<int32_t>(R * T);
  const int64_t acc_stride = round_up(mmax, 32) * 32;
  int32_t* acc_all = ws.acc.get<int32_t>(P * 2 * acc_stride);
  const int64_t DC = down_chunk(H, {256, 128, 64}, 1, 4 * P), DG = DC / 32;  // all experts a task, >= 4 a thread
  int32_t* dacc_all = ws.dacc.get<int32_t>(P * DG * acc_stride);
  float* y_all = ws.y.get<float>(T > 1 ? P * DG * acc_stride : 1);
  int8_t* qtmp_all = ws.qtmp.get<int8_t>(P * round_up(IL, 64));
  auto pan_rows = [&](int64_t a) { return pan0[a + 1] - pan0[a]; };

  // ---- tasks, claimed in index order (a task only waits for tasks of lower index)
  //   Q: quantize kQ tokens once each (token-major int8)
  //   then per expert a: P, copy kPack of its rows (tokens) into its panel, and G, gate/up of
  //      (a, slice t, gc 32-row groups); SiLU-gate into act. A panel is written just before the G
  //      tasks that read it (while the previous expert's run), so it is read from cache.
  //   S: re-quantize kRows rows of the intermediate of (a, t) into its panel once G of (a, t) is done
  //   D: DC columns of H over every expert: out = 0, then out += w * y in expert order (the order
  //      of the decode schedule), each expert once its S tasks are done (no barrier: the first
  //      experts' down products overlap the last experts' gate/up tasks).
  constexpr int64_t kQ = 4;
  const int64_t nQ = (tokens + kQ - 1) / kQ;
  const int64_t groups1 = IL / 32;
  const std::vector<int64_t> block_rows = token_block_rows(m_of, H);
  const int64_t gc = gate_groups_per_task(A, T, groups1, P);
  const int64_t gchunks = (groups1 + gc - 1) / gc;
  constexpr int64_t kPack = 64;
  std::vector<int64_t> seg0(A + 1);  // task index of expert a's first P task; its G tasks follow them
  seg0[0] = nQ;
  for (int64_t a = 0; a < A; ++a) seg0[a + 1] = seg0[a] + (m_of[a] + kPack - 1) / kPack + T * gchunks;
  const RequantTasks stasks(m_of, T);
  const int64_t nS = stasks.count();
  const int64_t nD = H / DC;
  const int64_t q_end = nQ, g_end = seg0[A], s_end = g_end + nS, total = s_end + nD;

  std::atomic<int64_t> q_left{nQ};
  const auto p_left = counters(A, [&](int64_t a) { return (m_of[a] + kPack - 1) / kPack; });
  const auto g_left = counters(A * T, [&](int64_t) { return gchunks; });
  const auto s_left = counters(A, [&](int64_t a) { return stasks.of_expert(a); });
  std::atomic<int64_t> next{0};
  std::atomic<bool> abort{false};

  // the row group and activation rows a thread multiplies next, so that its kernel prefetches them while it
  // multiplies the current ones (where the ISA's kernel takes hints: AMX)
  const TiledKernels& tk = call.k.tiled;
  auto hint = [&](const uint8_t* w, int64_t n, int64_t k, int64_t r0) {
    if (tk.hint_next_group) tk.hint_next_group(w, n, k, r0);
  };
  auto hint_rows = [&](const void* p, int64_t bytes) {
    if (tk.hint_next_rows) tk.hint_next_rows(p, bytes);
  };

  auto run_task = [&](int64_t task, int tid) {
    int32_t* acc = acc_all + static_cast<int64_t>(tid) * 2 * acc_stride;
    StageProfile::Clock clock = profile.clock(tid);
    auto mark = [&](int stage) { clock.mark(stage); };
    auto wait = [&](const std::atomic<int64_t>& counter) {
      wait_zero(counter, abort);
      mark(kStWait);
    };
    if (task < q_end) {  // ---- Q
      const int64_t t1 = std::min(tokens, (task + 1) * kQ);
      for (int64_t tk = task * kQ; tk < t1; ++tk) xqd[tk] = epi.quantize(x + tk * H, H, xq + tk * H, &xqs[tk]);
      mark(kStQ);
      q_left.fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < g_end) {
      const int64_t a = static_cast<int64_t>(std::upper_bound(seg0.begin(), seg0.end(), task) - seg0.begin()) - 1;
      const int64_t np = (m_of[a] + kPack - 1) / kPack;
      if (task - seg0[a] < np) {  // ---- P: rows i0 .. i1 of expert a, 64 bytes (one tile row) at a time
        wait(q_left);
        const int64_t i0 = (task - seg0[a]) * kPack, i1 = std::min(m_of[a], i0 + kPack);
        int8_t* dst = xpan + pan0[a] * H;
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t r = row0[a] + i, tk = rt.row_token[r];
          for (int64_t c = 0; c < H; c += 64) std::memcpy(LX.at(dst, i, c), xq + tk * H + c, 64);
          xd[r] = xqd[tk];
          xs[r] = xqs[tk];
        }
        mark(kStPack);
        p_left[a].fetch_sub(1, std::memory_order_acq_rel);
        return;
      }
      // ---- G
      wait(p_left[a]);
      const int64_t i1 = task - seg0[a] - np;
      const int64_t ch = i1 % gchunks, t = i1 / gchunks, at = a * T + t;
      const int64_t m = m_of[a];
      const ExpertShard& sh = weights.shards[active[a] * T + t];
      int32_t* ag = acc;
      int32_t* au = acc + acc_stride;
      const int8_t* xa = xpan + pan0[a] * H;
      const float* xda = xd + row0[a];
      const int32_t* xsa = xs + row0[a];
      float* act_at = act + (row0[a] * T + t * m) * IL;
      // token blocks outside, row groups inside: the task's weights (2 x gc groups) are read from
      // memory for the first block and from L2 for the others; each block's panel stays in L2
      const int64_t g0 = ch * gc, g1 = std::min(groups1, (ch + 1) * gc);
      for (int64_t i0 = 0; i0 < m; i0 += block_rows[a]) {
        const int64_t mb = std::min(m - i0, block_rows[a]);
        const int8_t* xb = LX.at(xa, i0, 0);  // i0 % 32 == 0: the panel of rows i0..
        // the next token block's panel, a 1/(2 x groups) piece per product
        const int64_t nxt = std::min(m - i0 - mb, block_rows[a]);
        const int64_t piece = round_up(nxt, 16) * H / (2 * (g1 - g0));
        const int8_t* xn = nxt > 0 ? LX.at(xa, i0 + mb, 0) : nullptr;
        for (int64_t g = g0; g < g1; ++g) {
          const int64_t r0 = g * 32;
          hint(sh.up.w, IL, H, r0);
          if (xn) hint_rows(xn + (2 * (g - g0)) * piece, piece);
          dot(cfg.method, sh.gate.w, IL, H, r0, xb, LX, xsa + i0, mb, ag);
          if (g + 1 < g1 || i0 + mb < m) hint(sh.gate.w, IL, H, g + 1 < g1 ? r0 + 32 : g0 * 32);
          if (xn) hint_rows(xn + (2 * (g - g0) + 1) * piece, piece);
          dot(cfg.method, sh.up.w, IL, H, r0, xb, LX, xsa + i0, mb, au);
          mark(kStGDot);
          epi.silu_gate(ag, au, mb, xda + i0, sh.gate.s + r0, sh.up.s + r0, GateAct::of(weights, active[a], t, r0),
                        act_at + i0 * IL + r0, IL);
          mark(kStGEpi);
        }
      }
      g_left[at].fetch_sub(1, std::memory_order_acq_rel);
    } else if (task < s_end) {  // ---- S
      const RequantTasks::Task s = stasks.task(task - g_end, m_of);
      wait(g_left[s.a * T + s.t]);
      const int64_t base = row0[s.a] * T + s.t * m_of[s.a];
      requantize_rows(epi, act + base * IL, IL, s.i0, s.i1, apan + (pan0[s.a] * T + s.t * pan_rows(s.a)) * IL, LA,
                      ad + base, as + base, qtmp_all + static_cast<int64_t>(tid) * round_up(IL, 64));
      mark(kStS);
      s_left[s.a].fetch_sub(1, std::memory_order_acq_rel);
    } else {  // ---- D: columns c0 .. c0+DC over every expert
      const int64_t c0 = (task - s_end) * DC;
      // 32-column group g of the chunk: int32 sums at dacc + g*acc_stride, partial sums over the
      // slices (T > 1) at y + g*acc_stride; out rows are then updated DC contiguous columns at a time.
      int32_t* dacc = dacc_all + static_cast<int64_t>(tid) * DG * acc_stride;
      float* y = y_all + static_cast<int64_t>(tid) * DG * acc_stride;
      auto panel = [&](int64_t a, int64_t t) { return apan + (pan0[a] * T + t * pan_rows(a)) * IL; };
      for (int64_t a = 0; a < A; ++a) {
        wait(s_left[a]);
        const int64_t m = m_of[a];
        // y[i*32+j] = down bias (or zero) + Σ_t down_t rows r0..r0+31, in t order (as the decode schedule)
        for (int64_t t = 0; t < T; ++t) {
          const ExpertShard& sh = weights.shards[active[a] * T + t];
          const int64_t base = row0[a] * T + t * m;
          // the next (expert, slice): its first row group, and its panel, a 1/DG piece per product
          const bool more = t + 1 < T || a + 1 < A;
          const int64_t a2 = t + 1 < T ? a : a + 1, t2 = t + 1 < T ? t + 1 : 0;
          const int64_t piece = more ? pan_rows(a2) * IL / DG : 0;
          for (int64_t g = 0; g < DG; ++g) {
            if (g + 1 < DG) {
              hint(sh.down.w, H, IL, c0 + (g + 1) * 32);
            } else if (more) {
              hint(weights.shards[active[a2] * T + t2].down.w, H, IL, c0);
            }
            if (more) hint_rows(panel(a2, t2) + g * piece, piece);
            dot(cfg.method, sh.down.w, H, IL, c0 + g * 32, panel(a, t), LA, as + base, m, dacc + g * acc_stride);
          }
          mark(kStDDot);
          if (t == 0) {  // out = 0: a token's row is zeroed (in cache) just before its first expert adds to it
            for (int64_t r = row0[a]; r < row0[a + 1]; ++r) {
              float* o = out + rt.row_token[r] * H + c0;
              if (first_row[rt.row_token[r]] == r) std::fill(o, o + DC, 0.f);
            }
          }
          if (t + 1 < T) {
            for (int64_t g = 0; g < DG; ++g)
              epi.down(dacc + g * acc_stride, m, ad + base, sh.down.s + c0 + g * 32, y + g * acc_stride, 32, t == 0,
                       weights.down_b(active[a], c0 + g * 32));
          } else {  // last slice: fused with out[token] += w * y
            epi.down_out(dacc, acc_stride, DG, m, ad + base, sh.down.s + c0, t == 0 ? nullptr : y,
                         weights.down_b(active[a], c0),
                         rt.row_weight.data() + row0[a], rt.row_token.data() + row0[a], out + c0, H);
          }
          mark(kStDEpi);
        }
      }
    }
  };

  profile.region_start();
  run_tasks_in_order(call.pool, total, tk.prepare_thread, next, abort, run_task);
  profile.publish({{"gate_groups_per_task", static_cast<double>(gc)},
                   {"rows_per_token_block", static_cast<double>(*std::max_element(block_rows.begin(), block_rows.end()))},
                   {"down_cols_per_task", static_cast<double>(DC)}});
}

}  // namespace detail

}  // namespace moe
}  // namespace kt
