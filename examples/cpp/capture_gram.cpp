// Reads a pyengine capture with the plain HDF5 C API (no h5py, no plugin: the store's default gzip,
// shuffle and fletcher32 filters are built into every libhdf5) and computes a layer's activation
// Gram spectrum with pyengine::core::gram_accumulate, as `gram-spectrum` does: the layer's units
// are one dim of its values (the stored `unit_dim` attribute, dim 1 for (rows, units) values),
// every other position of a row is a sample, padded tokens (/inputs/mask) are dropped, and the
// spectrum is that of the covariance (gram - s s^T / n) / n (--no-center: gram / n).
//
// Usage: capture_gram CAPTURE.h5 LAYER [--units auto|channels|last|flatten] [--no-center]
//                     [--rows N] [--threads T] [--matrix]
// Prints "hdf5 X.Y.Z" (the library it runs with), "units U", "samples S", "unit_dim K",
// "eigenvalues v1 v2 ..." (descending) and, with --matrix, the matrix, one "row" line per unit.
// Errors (a bad path, a missing layer, a file that is not a capture): one line on stderr, exit status 2.
#include <hdf5.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "pyengine/core/gram.h"

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An HDF5 identifier closed by `close` when it goes out of scope.
class Handle {
 public:
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  bool ok() const { return id_ >= 0; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

void check(herr_t status, const std::string& what) {
  if (status < 0) throw UsageError(what);
}

bool link_exists(hid_t location, const char* name) { return H5Lexists(location, name, H5P_DEFAULT) > 0; }

// A string attribute (variable- or fixed-length), "" when absent or not a string.
std::string string_attribute(hid_t object, const char* name) {
  if (H5Aexists(object, name) <= 0) return "";
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  Handle type(H5Aget_type(attribute.get()), H5Tclose);
  if (!attribute.ok() || !type.ok() || H5Tget_class(type.get()) != H5T_STRING) return "";
  if (H5Tis_variable_str(type.get()) > 0) {
    Handle memory(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(memory.get(), H5T_VARIABLE);
    H5Tset_cset(memory.get(), H5Tget_cset(type.get()));
    char* text = nullptr;
    if (H5Aread(attribute.get(), memory.get(), &text) < 0 || text == nullptr) return "";
    std::string out(text);
    H5free_memory(text);
    return out;
  }
  std::string out(H5Tget_size(type.get()), '\0');
  if (H5Aread(attribute.get(), type.get(), out.data()) < 0) return "";
  return out.substr(0, out.find('\0'));
}

// The integer attribute `name`, or `fallback` when it is absent.
long long int_attribute(hid_t object, const char* name, long long fallback) {
  if (H5Aexists(object, name) <= 0) return fallback;
  Handle attribute(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  long long value = fallback;
  if (!attribute.ok() || H5Aread(attribute.get(), H5T_NATIVE_LLONG, &value) < 0) return fallback;
  return value;
}

// The names in a group, in creation order when the group tracks it (captures do), else by name.
std::string stored_layers(hid_t group) {
  H5G_info_t info;
  if (H5Gget_info(group, &info) < 0) return "?";
  const H5_index_t index =
      info.nlinks > 0 && H5Lget_name_by_idx(group, ".", H5_INDEX_CRT_ORDER, H5_ITER_INC, 0, nullptr, 0, H5P_DEFAULT) > 0
          ? H5_INDEX_CRT_ORDER
          : H5_INDEX_NAME;
  std::string out;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t size = H5Lget_name_by_idx(group, ".", index, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (size <= 0) continue;
    std::vector<char> name(static_cast<std::size_t>(size) + 1, '\0');
    if (H5Lget_name_by_idx(group, ".", index, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT) < 0) continue;
    out += (out.empty() ? "" : ", ") + std::string(name.data());
  }
  return out.empty() ? "none" : out;
}

// Eigenvalues (descending) of a symmetric matrix (row-major, n x n): Householder reduction to
// tridiagonal form, then the implicit QL algorithm with Wilkinson shifts. Backward stable: each
// eigenvalue is exact for a matrix within a few ulps of `a`'s norm.
std::vector<double> symmetric_eigenvalues(std::vector<double> a, int n) {
  std::vector<double> d(n), e(n, 0.0);
  auto at = [&](int i, int j) -> double& { return a[static_cast<std::size_t>(i) * n + j]; };
  for (int i = n - 1; i > 0; --i) {  // tred2 without the eigenvectors
    const int l = i - 1;
    double h = 0.0, scale = 0.0;
    if (l > 0) {
      for (int k = 0; k <= l; ++k) scale += std::abs(at(i, k));
      if (scale == 0.0) {
        e[i] = at(i, l);
      } else {
        for (int k = 0; k <= l; ++k) {
          at(i, k) /= scale;
          h += at(i, k) * at(i, k);
        }
        double f = at(i, l);
        const double g = f >= 0 ? -std::sqrt(h) : std::sqrt(h);
        e[i] = scale * g;
        h -= f * g;
        at(i, l) = f - g;
        f = 0.0;
        for (int j = 0; j <= l; ++j) {
          double s = 0.0;
          for (int k = 0; k <= j; ++k) s += at(j, k) * at(i, k);
          for (int k = j + 1; k <= l; ++k) s += at(k, j) * at(i, k);
          e[j] = s / h;
          f += e[j] * at(i, j);
        }
        const double hh = f / (h + h);
        for (int j = 0; j <= l; ++j) {
          const double fj = at(i, j);
          const double gj = e[j] - hh * fj;
          e[j] = gj;
          for (int k = 0; k <= j; ++k) at(j, k) -= fj * e[k] + gj * at(i, k);
        }
      }
    } else {
      e[i] = at(i, l);
    }
    d[i] = h;
  }
  for (int i = 0; i < n; ++i) d[i] = at(i, i);
  for (int i = 1; i < n; ++i) e[i - 1] = e[i];  // tqli: off-diagonal shifted down
  if (n > 0) e[n - 1] = 0.0;
  for (int l = 0; l < n; ++l) {
    for (int iteration = 0;; ++iteration) {
      int m = l;
      for (; m < n - 1; ++m) {
        const double dd = std::abs(d[m]) + std::abs(d[m + 1]);
        if (std::abs(e[m]) <= std::numeric_limits<double>::epsilon() * dd) break;
      }
      if (m == l) break;
      if (iteration == 60) throw std::runtime_error("eigenvalues did not converge");
      double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
      double r = std::hypot(g, 1.0);
      g = d[m] - d[l] + e[l] / (g + (g >= 0 ? r : -r));
      double s = 1.0, c = 1.0, p = 0.0;
      int i = m - 1;
      for (; i >= l; --i) {
        double f = s * e[i];
        const double b = c * e[i];
        r = std::hypot(f, g);
        e[i + 1] = r;
        if (r == 0.0) {
          d[i + 1] -= p;
          e[m] = 0.0;
          break;
        }
        s = f / r;
        c = g / r;
        g = d[i + 1] - p;
        r = (d[i] - g) * s + 2.0 * c * b;
        p = s * r;
        d[i + 1] = g + p;
        g = c * r - b;
      }
      if (r == 0.0 && i >= l) continue;
      d[l] -= p;
      e[l] = g;
      e[m] = 0.0;
    }
  }
  std::sort(d.begin(), d.end(), [](double x, double y) { return x > y; });
  return d;
}

struct Options {
  std::string path, layer, units = "auto";
  bool center = true, matrix = false;
  long long rows = 0;  // rows per read; 0: about 8 MiB of values
  int threads = 1;
};

Options parse(int argc, char** argv) {
  if (argc < 3) {
    throw UsageError(
        "usage: capture_gram CAPTURE.h5 LAYER [--units auto|channels|last|flatten] [--no-center] [--rows N] "
        "[--threads T] [--matrix]");
  }
  Options options{argv[1], argv[2]};
  for (int i = 3; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "--units") {
      options.units = value();
      if (options.units != "auto" && options.units != "channels" && options.units != "last" &&
          options.units != "flatten") {
        throw UsageError("--units " + options.units + " is invalid: expected auto, channels, last or flatten");
      }
    } else if (flag == "--no-center") {
      options.center = false;
    } else if (flag == "--matrix") {
      options.matrix = true;
    } else if (flag == "--rows" || flag == "--threads") {
      const std::string text = value();
      char* end = nullptr;
      const long long number = std::strtoll(text.c_str(), &end, 10);
      if (end == text.c_str() || *end != '\0' || number < 1)
        throw UsageError(flag + " " + text + " is invalid: expected an integer >= 1");
      if (flag == "--rows")
        options.rows = number;
      else
        options.threads = static_cast<int>(std::min<long long>(number, 1024));
    } else {
      throw UsageError("unknown option " + flag);
    }
  }
  return options;
}

int run(const Options& options) {
  const std::string& path = options.path;
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file.ok())
    throw UsageError(
        path + ": cannot open it as an HDF5 file (missing, unreadable, not HDF5, or a capture still being written)");
  if (!link_exists(file.get(), "meta")) throw UsageError(path + ": not a pyengine capture (no /meta)");
  {
    Handle meta(H5Oopen(file.get(), "meta", H5P_DEFAULT), H5Oclose);
    if (string_attribute(meta.get(), "format") != "pyengine") {
      throw UsageError(path + ": not a pyengine capture (/meta has no format='pyengine')");
    }
  }
  if (!link_exists(file.get(), "activations")) throw UsageError(path + ": holds no /activations");
  Handle group(H5Gopen2(file.get(), "activations", H5P_DEFAULT), H5Gclose);
  if (options.layer.empty() || options.layer.find('/') != std::string::npos ||
      !link_exists(group.get(), options.layer.c_str())) {
    throw UsageError(path + ": no layer '" + options.layer +
                     "' in /activations (stored: " + stored_layers(group.get()) + ")");
  }
  Handle dataset(H5Dopen2(group.get(), options.layer.c_str(), H5P_DEFAULT), H5Dclose);
  Handle space(H5Dget_space(dataset.get()), H5Sclose);
  Handle stored_type(H5Dget_type(dataset.get()), H5Tclose);
  if (!dataset.ok() || !space.ok() || !stored_type.ok())
    throw UsageError(path + ": cannot open /activations/" + options.layer);
  if (H5Tget_class(stored_type.get()) != H5T_FLOAT || H5Tget_size(stored_type.get()) > 4)
    throw UsageError(path + ": /activations/" + options.layer + " is not float16 or float32, what captures store");
  {  // a filter this libhdf5 lacks (h5py's lzf: --compression lzf) would fail every read: say which
    Handle create(H5Dget_create_plist(dataset.get()), H5Pclose);
    for (int i = 0; create.ok() && i < H5Pget_nfilters(create.get()); ++i) {
      unsigned flags = 0, config = 0;
      size_t count = 0;
      char name[64] = "";
      const H5Z_filter_t filter =
          H5Pget_filter2(create.get(), static_cast<unsigned>(i), &flags, &count, nullptr, sizeof name, name, &config);
      if (filter >= 0 && H5Zfilter_avail(filter) <= 0) {
        throw UsageError(path + ": /activations/" + options.layer + " is compressed with HDF5 filter " +
                         std::to_string(filter) + " (" + name + "), which this libhdf5 lacks; capture with " +
                         "--compression gzip (every libhdf5 has it) or install that filter's plugin");
      }
    }
  }
  const int ndim = H5Sget_simple_extent_ndims(space.get());
  if (ndim < 2)
    throw UsageError(path + ": /activations/" + options.layer + " has " + std::to_string(ndim) +
                     " dims; expected (rows, units, ...)");
  std::vector<hsize_t> shape(ndim);
  H5Sget_simple_extent_dims(space.get(), shape.data(), nullptr);

  // The unit dim, as pyengine.units.UnitAxes resolves it (0: every value of a row is a unit).
  int unit_dim;
  if (options.units == "flatten")
    unit_dim = 0;
  else if (ndim == 2)
    unit_dim = 1;
  else if (options.units == "channels")
    unit_dim = 1;
  else if (options.units == "last")
    unit_dim = ndim - 1;
  else {
    unit_dim = static_cast<int>(int_attribute(dataset.get(), "unit_dim", -1));
    if (unit_dim < 1 || unit_dim >= ndim) {
      throw UsageError(path + ": layer '" + options.layer +
                       "' records no unit_dim; pass --units channels (dim 1) or --units last (dim " +
                       std::to_string(ndim - 1) + ")");
    }
  }
  const long long rows = static_cast<long long>(shape[0]);
  long long row_size = 1, outer = 1, inner = 1;
  for (int k = 1; k < ndim; ++k) row_size *= static_cast<long long>(shape[k]);
  for (int k = 1; k < unit_dim; ++k) outer *= static_cast<long long>(shape[k]);
  for (int k = unit_dim + 1; unit_dim > 0 && k < ndim; ++k) inner *= static_cast<long long>(shape[k]);
  const long long units = unit_dim == 0 ? row_size : static_cast<long long>(shape[unit_dim]);
  if (units > 8192)
    throw UsageError("layer '" + options.layer + "' has " + std::to_string(units) +
                     " units (> 8192); choose other --units");

  // Padded tokens of a (rows, T, D) sequence with units last are not samples (see units.as_unit_matrix).
  bool masked = false;
  Handle mask_set(link_exists(file.get(), "inputs") && link_exists(file.get(), "inputs/mask")
                      ? H5Dopen2(file.get(), "inputs/mask", H5P_DEFAULT)
                      : -1,
                  H5Dclose);
  if (mask_set.ok() && ndim == 3 && unit_dim == 2) {
    Handle mask_space(H5Dget_space(mask_set.get()), H5Sclose);
    hsize_t mask_shape[2] = {0, 0};
    masked = H5Sget_simple_extent_ndims(mask_space.get()) == 2 &&
             H5Sget_simple_extent_dims(mask_space.get(), mask_shape, nullptr) == 2 && mask_shape[0] == shape[0] &&
             mask_shape[1] == shape[1];
  }

  long long block = options.rows > 0 ? options.rows : std::max<long long>(1, (8LL << 20) / (4 * row_size));
  block = std::min(block, std::max<long long>(rows, 1));
  // HDF5 converts float16 (or any stored float) to native float while it reads: exact widening.
  std::vector<float> values(static_cast<std::size_t>(block * row_size));
  std::vector<float> samples(unit_dim == 0 || ndim == 2 ? 0 : values.size());
  std::vector<unsigned char> mask(masked ? static_cast<std::size_t>(block * shape[1]) : 0);
  std::vector<double> gram(static_cast<std::size_t>(units * units), 0.0), sums(units, 0.0);
  long long count = 0;
  for (long long first = 0; first < rows; first += block) {
    const long long n = std::min(block, rows - first);
    std::vector<hsize_t> start(ndim, 0), extent(shape);
    start[0] = static_cast<hsize_t>(first);
    extent[0] = static_cast<hsize_t>(n);
    Handle file_space(H5Dget_space(dataset.get()), H5Sclose);
    Handle memory_space(H5Screate_simple(ndim, extent.data(), nullptr), H5Sclose);
    check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start.data(), nullptr, extent.data(), nullptr),
          "bad selection");
    if (H5Dread(dataset.get(), H5T_NATIVE_FLOAT, memory_space.get(), file_space.get(), H5P_DEFAULT, values.data()) <
        0) {
      throw UsageError(path + ": reading rows " + std::to_string(first) + ".." + std::to_string(first + n) +
                       " of /activations/" + options.layer + " failed (damaged file?)");
    }
    const float* matrix = values.data();
    long long matrix_rows = n;
    if (unit_dim > 0 && ndim > 2) {  // (n, outer, units, inner) -> (n * outer * inner, units), padded tokens left out
      if (masked) {
        Handle mask_file_space(H5Dget_space(mask_set.get()), H5Sclose);
        hsize_t mask_start[2] = {static_cast<hsize_t>(first), 0}, mask_extent[2] = {static_cast<hsize_t>(n), shape[1]};
        Handle mask_memory(H5Screate_simple(2, mask_extent, nullptr), H5Sclose);
        check(H5Sselect_hyperslab(mask_file_space.get(), H5S_SELECT_SET, mask_start, nullptr, mask_extent, nullptr),
              "bad selection");
        if (H5Dread(mask_set.get(), H5T_NATIVE_UCHAR, mask_memory.get(), mask_file_space.get(), H5P_DEFAULT,
                    mask.data()) < 0) {
          throw UsageError(path + ": reading /inputs/mask failed (damaged file?)");
        }
      }
      matrix_rows = 0;
      for (long long r = 0; r < n; ++r) {
        for (long long o = 0; o < outer; ++o) {
          if (masked && mask[static_cast<std::size_t>(r * outer + o)] == 0) continue;
          const float* source = values.data() + (r * outer + o) * units * inner;
          for (long long i = 0; i < inner; ++i, ++matrix_rows) {
            float* target = samples.data() + matrix_rows * units;
            for (long long u = 0; u < units; ++u) target[u] = source[u * inner + i];
          }
        }
      }
      matrix = samples.data();
    }
    pyengine::core::MatrixView view{matrix, pyengine::core::DType::Float32, matrix_rows, units, units, 1};
    pyengine::core::gram_accumulate(view, gram.data(), sums.data(), options.threads);
    count += matrix_rows;
  }
  if (count == 0) throw UsageError(path + ": no rows for layer '" + options.layer + "'");

  std::vector<double> moment(gram.size());
  for (long long i = 0; i < units; ++i) {
    for (long long j = 0; j < units; ++j) {
      const double centre = options.center ? sums[i] * sums[j] / static_cast<double>(count) : 0.0;
      moment[i * units + j] = (gram[i * units + j] - centre) / static_cast<double>(count);
    }
  }
  const auto eigenvalues = symmetric_eigenvalues(moment, static_cast<int>(units));
  unsigned major = 0, minor = 0, release = 0;
  H5get_libversion(&major, &minor, &release);
  std::printf("hdf5 %u.%u.%u\nunits %lld\nsamples %lld\nunit_dim %d\neigenvalues", major, minor, release, units, count,
              unit_dim);
  for (double v : eigenvalues) std::printf(" %.17g", v);
  std::printf("\n");
  for (long long i = 0; options.matrix && i < units; ++i) {
    std::printf("row");
    for (long long j = 0; j < units; ++j) std::printf(" %.17g", moment[i * units + j]);
    std::printf("\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // HDF5's error stack stays quiet: one line of ours instead
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "capture_gram: error: %s\n", error.what());
    return 2;
  }
}
