// Index builders for the Megatron-compatible GPT and blended datasets.
//
// Both loops touch every document or every sample once, which is too slow in Python for
// billion-token corpora. The GIL is released while they run so other threads (e.g. a data
// loader's prefetcher) keep going.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int32Array = py::array_t<int32_t, py::array::c_style>;

// Row j of the sample index is where sample j starts: (position in document_index, token offset).
// Sample j spans stream[j*L, j*L + L + extra) of the documents concatenated in document_index
// order. A row points at the document holding sample j-1's last token (never an empty document),
// which is exactly how Megatron-LM writes it, so cached indices are interchangeable.
template <typename T>
py::array build_sample_index_typed(const int32_t *sizes, int64_t num_sizes, const int32_t *document_index,
                                   int64_t document_index_length, int64_t seq_length, int64_t extra_token,
                                   int64_t num_samples) {
    py::array_t<T> result({num_samples + 1, static_cast<int64_t>(2)});
    T *rows = result.mutable_data();
    std::string error;
    {
        py::gil_scoped_release release;
        int64_t doc_position = 0;
        int64_t doc_offset = 0;
        rows[0] = 0;
        rows[1] = 0;
        for (int64_t sample = 1; sample <= num_samples && error.empty(); ++sample) {
            int64_t remaining = seq_length + extra_token;  // always >= 1 inside the loop
            while (true) {
                if (doc_position >= document_index_length) {
                    error = "sample " + std::to_string(sample - 1) + " runs past the end of the document index (" +
                            std::to_string(document_index_length) + " entries): tokens_per_epoch or num_epochs "
                            "does not match the sizes";
                    break;
                }
                const int32_t sequence_id = document_index[doc_position];
                if (sequence_id < 0 || sequence_id >= num_sizes) {
                    error = "document index entry " + std::to_string(doc_position) + " = " +
                            std::to_string(sequence_id) + " is outside the " + std::to_string(num_sizes) +
                            " sequences";
                    break;
                }
                const int64_t available = static_cast<int64_t>(sizes[sequence_id]) - doc_offset;
                if (remaining <= available) {
                    doc_offset += remaining - extra_token;
                    break;
                }
                remaining -= available;
                ++doc_position;
                doc_offset = 0;
            }
            rows[2 * sample] = static_cast<T>(doc_position);
            rows[2 * sample + 1] = static_cast<T>(doc_offset);
        }
    }
    if (!error.empty()) {
        throw std::invalid_argument("build_sample_idx: " + error);
    }
    return result;
}

py::array build_sample_idx(const Int32Array &sizes, const Int32Array &document_index, int64_t seq_length,
                           int64_t num_epochs, int64_t tokens_per_epoch, bool add_extra_token) {
    if (sizes.ndim() != 1 || document_index.ndim() != 1) {
        throw std::invalid_argument("build_sample_idx: sizes and document_index must be 1-D int32 arrays");
    }
    if (seq_length < 1) {
        throw std::invalid_argument("build_sample_idx: seq_length must be >= 1, got " + std::to_string(seq_length));
    }
    if (num_epochs < 1 || tokens_per_epoch < 0) {
        throw std::invalid_argument("build_sample_idx: need num_epochs >= 1 and tokens_per_epoch >= 0");
    }
    const int64_t extra_token = add_extra_token ? 1 : 0;
    const int64_t total_tokens = num_epochs * tokens_per_epoch;
    const int64_t num_samples = total_tokens >= extra_token ? (total_tokens - extra_token) / seq_length : 0;

    const int32_t *sizes_ptr = sizes.data();
    const int64_t num_sizes = sizes.shape(0);
    int64_t largest_value = document_index.shape(0);
    for (int64_t i = 0; i < num_sizes; ++i) {
        largest_value = std::max<int64_t>(largest_value, sizes_ptr[i]);
    }
    // Same dtype rule as Megatron-LM (int32 unless a position or offset could overflow it).
    if (largest_value <= std::numeric_limits<int32_t>::max()) {
        return build_sample_index_typed<int32_t>(sizes_ptr, num_sizes, document_index.data(), document_index.shape(0),
                                                 seq_length, extra_token, num_samples);
    }
    return build_sample_index_typed<int64_t>(sizes_ptr, num_sizes, document_index.data(), document_index.shape(0),
                                             seq_length, extra_token, num_samples);
}

// Greedy blend: each position goes to the dataset furthest below its target share so far.
// Returns (dataset_index int16[size], dataset_sample_index int64[size]).
py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast> &weights,
                                 int64_t size) {
    if (weights.ndim() != 1 || weights.shape(0) < 1 || weights.shape(0) > std::numeric_limits<int16_t>::max()) {
        throw std::invalid_argument("build_blending_indices: weights must be 1-D with 1 to 32767 entries");
    }
    if (size < 0) {
        throw std::invalid_argument("build_blending_indices: size must be >= 0, got " + std::to_string(size));
    }
    const int64_t num_datasets = weights.shape(0);
    py::array_t<int16_t> dataset_index(size);
    py::array_t<int64_t> dataset_sample_index(size);
    int16_t *dataset_out = dataset_index.mutable_data();
    int64_t *sample_out = dataset_sample_index.mutable_data();
    const double *weight = weights.data();
    std::vector<int64_t> counts(num_datasets, 0);
    {
        py::gil_scoped_release release;
        for (int64_t position = 0; position < size; ++position) {
            const double progress = position > 1 ? static_cast<double>(position) : 1.0;
            int64_t best = 0;
            double best_error = weight[0] * progress - static_cast<double>(counts[0]);
            for (int64_t d = 1; d < num_datasets; ++d) {
                const double error = weight[d] * progress - static_cast<double>(counts[d]);
                if (error > best_error) {  // strict: ties go to the lowest index
                    best_error = error;
                    best = d;
                }
            }
            dataset_out[position] = static_cast<int16_t>(best);
            sample_out[position] = counts[best];
            ++counts[best];
        }
    }
    return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
    m.doc() = "C++ index builders for megatron_lm's GPT and blended datasets";
    m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("document_index"), py::arg("seq_length"),
          py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("add_extra_token"),
          "Sample index of shape (n+1, 2), n = (num_epochs*tokens_per_epoch - extra) // seq_length; int32, or int64 "
          "when positions or sizes exceed int32.");
    m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
          "Greedy weighted blend: (dataset_index int16[size], dataset_sample_index int64[size]).");
}
