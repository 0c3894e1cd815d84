#!/bin/sh
# A bare mirror of the monorepo at REPOSITORY_REF. The controller asks the agent for its
# commit (`spotbuild agent info --mirror`) and ships only what the mirror lacks.
set -eu
: "${REPOSITORY_URL:?}" "${REPOSITORY_REF:?}" "${SPOTBUILD_USER:?}"
mirror=/var/lib/spotbuild/mirror.git
rm -rf "$mirror"
git clone --quiet --bare --single-branch --branch "$REPOSITORY_REF" "$REPOSITORY_URL" "$mirror"
# No credential that was in the URL stays on the image.
git --git-dir="$mirror" remote remove origin
git --git-dir="$mirror" symbolic-ref HEAD "refs/heads/$REPOSITORY_REF"
commit=$(git --git-dir="$mirror" rev-parse --verify "HEAD^{commit}")
echo "$commit" > /var/lib/spotbuild/mirror.commit
chown -R "$SPOTBUILD_USER:$SPOTBUILD_USER" "$mirror" /var/lib/spotbuild/mirror.commit
echo "mirrored $REPOSITORY_REF at $commit"
