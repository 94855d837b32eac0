_gpu_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -d "$_gpu_dir/bin" ] || tar -C "$_gpu_dir" -xJf "$_gpu_dir/bin.tar.xz"
# Source on the GPU host from the project root: installs the staged Vulkan/EGL loaders and points them at the NVIDIA driver.
_gpu_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for f in "$_gpu_dir"/deb/*.deb; do dpkg -x "$f" / ; done
ldconfig
for d in /usr/local/nvidia/share /usr/share; do
  [ -f $d/vulkan/icd.d/nvidia_icd.json ] && export VK_DRIVER_FILES=$d/vulkan/icd.d/nvidia_icd.json && break
done
[ -f /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ] && export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
export PATH="$_gpu_dir/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || true
